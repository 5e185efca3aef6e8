// Recovery plans: several VMs failed over in order (a domain controller, then a database, then
// the app). The list of plans with their last test, one plan with its groups and its last runs
// (per VM: proven or not, RTO, screenshot; the plan's total RTO), the editor (groups of VMs in
// boot order, each VM's network, wait for the boot proof or a delay), "Run a test" and
// "Fail over" (after a confirmation).
//
// Polling, as the failover screens do: a run changes a few times a minute, and only while one
// runs does the screen poll. Every timer is cleared when the screen is left (view.onDispose).

import { api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { ago, count, dateTime, describeCron, listText, secondsSince, time } from "../format.js";
import { button, card, confirmDialog, deleteButton, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast } from "../ui.js";
import { JOB_DONE, rtoText } from "./failover_words.js";
import { networkPicker, networkText } from "./network_picker.js";

const POLL_MS = 2000;
const VM_STATES = {
  waiting: ["Waiting", "neutral"],
  booting: ["Booting", "info"],
  proven: ["Proven", "good"],
  failed: ["Failed", "bad"],
  not_started: ["Not started", "neutral"],
};
const KIND_NAMES = { test: "Test run", failover: "Failover" };

/** "3 VMs in 2 groups" */
function planSize(plan) {
  const vms = plan.groups.reduce((n, g) => n + g.vms.length, 0);
  return `${count(vms, "VM")} in ${count(plan.groups.length, "group")}`;
}

/** A run in a few words, with its tone: "Proven, total RTO 21.4 s" or "Failed: dc failed: …". */
function runWords(run) {
  if (run.state === "running") return ["Running now", "info"];
  if (run.state === "succeeded") return [`Every VM proven, total RTO ${rtoText(run.total_rto_seconds)}`, "good"];
  return [run.error ? `Failed: ${run.error}` : "Failed", "bad"];
}

function lastTestCell(plan) {
  const run = plan.last_test;
  if (!run) return h("span", { class: "muted", text: "Never tested" });
  const [words, tone] = runWords(run);
  return h(
    "div",
    pill(run.state === "succeeded" ? "Proven" : run.state === "running" ? "Testing" : "Failed", tone, words),
    " ",
    h("span", { class: "small", text: `${ago(secondsSince(run.requested_at))}${run.total_rto_seconds != null ? `, total RTO ${rtoText(run.total_rto_seconds)}` : ""}` }),
  );
}

function afterText(group, last) {
  if (last) return null;
  return group.after === "delay" ? `then the next group starts ${count(group.delay_seconds, "second")} later` : "then the next group starts once every VM here has booted";
}

function groupsView(plan) {
  return h(
    "ol",
    { class: "plan-groups" },
    plan.groups.map((group, i) =>
      h(
        "li",
        { class: "plan-group", dataset: { group: String(i + 1) } },
        h("strong", { text: `Group ${i + 1}: ` }),
        listText(group.vms.map((vm) => `${vm.asset} (${vm.network ? networkText(vm.network) : "its own network setting"}${vm.point ? `, point ${vm.point.slice(0, 8)}` : ""})`)),
        afterText(group, i === plan.groups.length - 1) ? h("p", { class: "muted small", text: afterText(group, i === plan.groups.length - 1) }) : null,
      ),
    ),
  );
}

// --- running ------------------------------------------------------------------------------------

async function startRun(plan, kind, onStarted) {
  const job = await api.post(`/api/plans/${enc(plan.id)}/${kind === "test" ? "test" : "failover"}`);
  toast(kind === "test" ? `Test run of ${plan.name} started.` : `Failover of ${plan.name} started.`, { link: { href: `#/jobs/${enc(job.id)}`, text: "Follow the job" } });
  onStarted(job);
}

function runButtons(view, plan, onStarted) {
  if (!view.can("operator")) return [];
  const test = button("Run a test", {
    iconName: "play",
    "aria-label": `Run a test of ${plan.name}`,
    onClick: () => startRun(plan, "test", onStarted).catch((err) => view.banner.error(err)),
  });
  const failover = button("Fail over", {
    kind: "danger",
    "aria-label": `Fail over ${plan.name}`,
    onClick: () =>
      confirmDialog({
        title: `Fail over ${plan.name}?`,
        text: `This starts ${planSize(plan)} from their backups, one group after the other, on the networks of the plan. They keep running until you stop them on the Failover screen.`,
        confirmLabel: "Fail over the plan",
        action: () => startRun(plan, "failover", onStarted),
      }),
  });
  return [test, failover];
}

function runCard(run) {
  const [words, tone] = runWords(run);
  const title = `${KIND_NAMES[run.kind] || run.kind} of ${dateTime(run.requested_at)}`;
  return card(
    title,
    { subtitle: run.kind === "test" ? "Every VM booted isolated, proven, then shut down and discarded." : "Every VM failed over on its plan network." },
    h("p", { class: "plan-run-summary", dataset: { state: run.state } }, pill(run.state === "running" ? "Running" : run.state === "succeeded" ? "Succeeded" : "Failed", tone), " ", words),
    table(
      [
        { label: "Group", cell: (vm) => String(vm.group), className: "num" },
        { label: "VM", cell: (vm) => (vm.session ? h("a", { href: `#/failover/${enc(vm.session)}`, class: "strong", text: vm.asset }) : h("strong", { text: vm.asset })) },
        { label: "State", cell: (vm) => pill(...(VM_STATES[vm.state] || [vm.state, "neutral"]).slice(0, 2), vm.error) },
        { label: "Started", cell: (vm) => (vm.started_at ? time(vm.started_at) : "—"), className: "hide-md" },
        { label: "Booted", cell: (vm) => (vm.proven_at ? time(vm.proven_at) : "—"), className: "hide-md" },
        { label: "RTO", cell: (vm) => (vm.rto_seconds != null ? h("strong", { text: rtoText(vm.rto_seconds) }) : h("span", { class: "muted", text: vm.error || "—" })), className: "num" },
        { label: "Screen", cell: (vm) => (vm.screenshot_url ? h("a", { href: vm.screenshot_url, target: "_blank", rel: "noopener" }, h("img", { src: vm.screenshot_url, alt: `The screen of ${vm.asset} when it booted`, class: "plan-shot", loading: "lazy" })) : "—") },
      ],
      run.vms,
      { caption: title, rowAttrs: (vm) => ({ dataset: { vm: vm.asset, state: vm.state } }) },
    ),
    run.total_rto_seconds != null ? h("p", { class: "plan-total" }, "Total RTO, from the click to the last VM's boot proof: ", h("strong", { text: rtoText(run.total_rto_seconds) })) : null,
  );
}

// --- the editor ---------------------------------------------------------------------------------

function vmRow(vmNames, vm, onRemove) {
  const assetSelect = select("asset", vmNames.map((n) => [n, n]), vm.asset || vmNames[0], { "aria-label": "Virtual machine" });
  const netBox = h("div");
  const summary = h("summary", { text: "Network" });
  let picker = null;
  const makePicker = () => {
    // A VM whose plan names a network starts from it; otherwise from "as configured".
    picker = vm.network && assetSelect.value === vm.asset ? networkPicker(assetSelect.value, { purpose: "settings", initial: vm.network }) : networkPicker(assetSelect.value, { purpose: "failover" });
    replace(netBox, picker.element);
  };
  assetSelect.addEventListener("change", makePicker);
  makePicker();
  const row = h(
    "li",
    { class: "plan-vm" },
    h("div", { class: "plan-vm-head" }, assetSelect, button("Remove", { kind: "small", "aria-label": "Remove this VM", onClick: () => onRemove(row) })),
    h("details", { class: "plan-vm-net" }, summary, netBox),
  );
  row.planValue = () => ({ asset: assetSelect.value, network: picker.value(), ...(vm.point && assetSelect.value === vm.asset ? { point: vm.point } : {}) });
  return row;
}

function groupBox(vmNames, group, onRemove) {
  const list = h("ul", { class: "plan-vms" });
  const addVm = (vm) => list.appendChild(vmRow(vmNames, vm, (row) => row.remove()));
  for (const vm of group.vms) addVm(vm);
  const after = select("after", [["proof", "Wait until every VM of this group has booted"], ["delay", "Wait a fixed time"]], group.after || "proof", { "aria-label": "Before the next group" });
  const delay = h("input", { type: "number", name: "delay_seconds", min: "0", max: "86400", step: "1", value: String(group.delay_seconds || 30), class: "plan-delay", "aria-label": "Seconds to wait" });
  const delayPart = h("span", { class: "plan-delay-part" }, delay, " seconds");
  const sync = () => (delayPart.hidden = after.value !== "delay");
  after.addEventListener("change", sync);
  sync();
  const box = h(
    "fieldset",
    { class: "plan-group-edit" },
    h("legend", { class: "plan-group-title", text: "Group" }),
    list,
    h("div", { class: "plan-group-actions" }, button("Add a VM", { kind: "small", onClick: () => addVm({}) }), button("Remove the group", { kind: "small", onClick: () => onRemove(box) })),
    field({ label: "Before the next group starts", control: h("div", after, " ", delayPart) }),
  );
  box.planValue = () => ({
    vms: [...list.children].map((row) => row.planValue()),
    after: after.value,
    delay_seconds: after.value === "delay" ? Number(delay.value) : 0,
  });
  return box;
}

async function openEditor(view, plan, onSaved) {
  const assets = await api.get("/api/assets");
  const vmNames = assets.filter((a) => a.kind === "vm").map((a) => a.name);
  if (!vmNames.length) {
    view.banner.show("error", "No virtual machines yet", "Add a VM asset under Assets & policies first.");
    return;
  }
  const existing = plan || { name: "", groups: [{ vms: [{}], after: "proof" }], test_cron: null };
  const groupsList = h("div", { class: "plan-groups-edit" });
  const number = () => groupsList.querySelectorAll(".plan-group-title").forEach((el, i) => (el.textContent = `Group ${i + 1}`));
  const addGroup = (group) => {
    groupsList.appendChild(groupBox(vmNames, group, (box) => (box.remove(), number())));
    number();
  };
  for (const group of existing.groups) addGroup(group);
  const body = h(
    "div",
    field({ label: "Name", name: "name", value: existing.name, required: true, maxlength: "100", placeholder: "Head office" }),
    h("p", { class: "help", text: "The groups boot in order. The VMs of one group start together." }),
    groupsList,
    button("Add a group", { onClick: () => addGroup({ vms: [{}], after: "proof" }) }),
    field({ label: "Test on a schedule", name: "test_cron", value: existing.test_cron || "", placeholder: "0 4 * * 0", help: "A cron time, e.g. “0 4 * * 0” is every Sunday at 04:00. Leave it empty to test only when you press “Run a test”." }),
  );
  formDialog({
    title: plan ? `Edit ${plan.name}` : "New recovery plan",
    body,
    wide: true,
    submitLabel: plan ? "Save" : "Create plan",
    onSubmit: async (form) => {
      const payload = {
        name: form.elements.name.value.trim(),
        groups: [...groupsList.children].map((box) => box.planValue()),
        test_cron: form.elements.test_cron.value.trim() || null,
      };
      const saved = plan ? await api.put(`/api/plans/${enc(plan.id)}`, payload) : await api.post("/api/plans", payload);
      toast(plan ? `Plan ${saved.name} saved.` : `Plan ${saved.name} created.`);
      onSaved(saved);
    },
  });
}

// --- the screens --------------------------------------------------------------------------------

export default async function plans(view) {
  const body = h("div", loading());
  const newPlan = view.can("operator") ? button("New plan", { kind: "primary", onClick: () => openEditor(view, null, (p) => view.navigate(`#/plans/${enc(p.id)}`)).catch((err) => view.banner.error(err)) }) : null;
  replace(view.el, pageHeader("Recovery plans", "Several VMs failed over in order with one click, and tested on a schedule.", ...(newPlan ? [newPlan] : [])), body);
  async function load() {
    const list = await api.get("/api/plans");
    replace(
      body,
      card(
        "Plans",
        { subtitle: "Open a plan to see its groups and its last runs." },
        list.length
          ? table(
              [
                { label: "Plan", cell: (p) => h("a", { href: `#/plans/${enc(p.id)}`, class: "strong", text: p.name }) },
                { label: "VMs", cell: (p) => planSize(p) },
                { label: "Last test", cell: lastTestCell },
                { label: "Scheduled test", cell: (p) => (p.test_cron ? describeCron(p.test_cron) : h("span", { class: "muted", text: "Only when asked" })), className: "hide-md" },
                {
                  label: "",
                  cell: (p) =>
                    view.can("operator")
                      ? deleteButton({ label: `Delete ${p.name}`, title: `Delete plan ${p.name}?`, text: "The plan is forgotten; its VMs and their backups are not touched, and its past runs are kept.", confirmLabel: "Delete plan", path: `/api/plans/${enc(p.id)}`, deleted: `Plan ${p.name} deleted.`, done: load })
                      : null,
                },
              ],
              list,
              { caption: "Recovery plans", rowAttrs: (p) => ({ dataset: { plan: p.name } }) },
            )
          : emptyState("play", "No recovery plans yet", "A plan fails several VMs over in the order they need: a domain controller first, then a database, then the applications.", ...(newPlan ? [button("Create a plan", { onClick: () => newPlan.click() })] : [])),
      ),
    );
  }
  await load();
}

export async function planDetail(view) {
  const id = view.params[0];
  const head = h("div");
  const runsBox = h("div", loading());
  replace(view.el, head, runsBox);
  let timer = null;
  let stopped = false;
  let pendingJob = null;
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });
  const follow = (job) => {
    pendingJob = job.id;
    load();
  };

  async function load() {
    clearTimeout(timer);
    const [plan, runs] = await Promise.all([api.get(`/api/plans/${enc(id)}`), api.get(`/api/plans/${enc(id)}/runs?limit=5`)]);
    if (stopped) return;
    view.setTitle(`Recovery plan ${plan.name}`);
    const edit = view.can("operator") ? button("Edit", { onClick: () => openEditor(view, plan, () => load()).catch((err) => view.banner.error(err)) }) : null;
    replace(
      head,
      pageHeader(plan.name, `${planSize(plan)}. ${plan.test_cron ? `Tested by itself: ${describeCron(plan.test_cron)}.` : "Tested only when asked."}`, ...runButtons(view, plan, follow), ...(edit ? [edit] : [])),
      card("Boot order", {}, groupsView(plan)),
    );
    let waiting = false;
    if (pendingJob) {
      const job = await api.get(`/api/jobs/${enc(pendingJob)}`);
      const started = runs.some((r) => r.job_id === pendingJob);
      waiting = !JOB_DONE.has(job.state) && !started;
      if (JOB_DONE.has(job.state) || started) pendingJob = started && !JOB_DONE.has(job.state) ? pendingJob : null;
    }
    replace(
      runsBox,
      waiting ? h("p", { class: "plan-pending", role: "status", text: "The run is queued; it starts as soon as the VMs are free." }) : null,
      runs.length ? runs.map(runCard) : waiting ? null : emptyState("play", "This plan has not run yet", "Run a test to prove every VM of the plan boots from its backup, in order, without touching your network."),
    );
    if (!stopped && (waiting || pendingJob || runs.some((r) => r.state === "running"))) timer = setTimeout(() => load().catch((err) => view.banner.error(err)), POLL_MS);
  }
  await load();
}
