// Assets (what is protected) and protection policies (when, how, how long, RPO).

import { api, enc } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { MODE_NAMES, dateTime, describeCron, period } from "../format.js";
import { button, busy, card, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast, deleteButton } from "../ui.js";

const MODES = [
  ["incremental", "Incremental (only changes)"],
  ["full", "Full (everything)"],
  ["differential", "Differential (changes since the last full)"],
];

const PRESETS = [
  ["0 * * * *", "Every hour"],
  ["0 */6 * * *", "Every 6 hours"],
  ["0 2 * * *", "Every day at 02:00"],
  ["0 2 * * 1-5", "Weekdays at 02:00"],
  ["0 3 * * 0", "Every Sunday at 03:00"],
  ["0 1 1 * *", "Monthly, on the 1st at 01:00"],
  ["", "Custom…"],
];

const KEEP = [
  ["keep_last", "Last points", "The newest N points, whenever they were made"],
  ["keep_hourly", "Hourly", "The newest point of each of the last N hours"],
  ["keep_daily", "Daily", "One a day for N days"],
  ["keep_weekly", "Weekly", "One a week for N weeks"],
  ["keep_monthly", "Monthly", "One a month for N months"],
  ["keep_yearly", "Yearly", "One a year for N years"],
];

export function retentionText(retention) {
  const parts = KEEP.filter(([key]) => retention && retention[key]).map(([key, label]) => (key === "keep_last" ? `last ${retention[key]}` : `${retention[key]} ${label.toLowerCase()}`));
  return parts.length ? `Keep ${parts.join(", ")}` : "Keep every point";
}

function kindText(kind) {
  return kind === "vm" ? "Virtual machine" : "Folder";
}

// --- asset dialog ------------------------------------------------------------------------------------

function assetDialog(existing, done) {
  const editing = Boolean(existing);
  const kind = existing ? existing.kind : "files";
  const radios = h(
    "fieldset",
    { class: "field radios" },
    h("legend", { class: "label", text: "What to protect" }),
    [
      ["files", "A folder", "Files and folders on the appliance (or mounted on it)"],
      ["vm", "A virtual machine", "Its disk images and, optionally, its definition"],
    ].map(([value, label, help]) =>
      h(
        "label",
        { class: "radio" },
        h("input", { type: "radio", name: "kind", value, checked: value === kind, disabled: editing }),
        h("span", h("strong", { text: label }), h("small", { class: "muted", text: help })),
      ),
    ),
  );
  const filesPart = h(
    "div",
    { class: "kind-files" },
    field({ label: "Folder", name: "path", value: existing?.path || "", placeholder: "/srv/share", required: true, help: "A full path on the appliance, starting with /." }),
  );
  const vmPart = h(
    "div",
    { class: "kind-vm" },
    field({
      label: "Disk images",
      help: "One path per line, e.g. /var/lib/vms/web.qcow2.",
      control: h("textarea", { name: "disks", rows: 3, placeholder: "/var/lib/vms/web.qcow2", text: (existing?.disks || []).join("\n") }),
    }),
    field({ label: "VM definition (optional)", name: "vm_spec", value: existing?.vm_spec || "", placeholder: "/etc/libvirt/qemu/web.xml", help: "libvirt XML, JSON or TOML; read at each backup." }),
  );
  const showKind = (k) => {
    filesPart.hidden = k !== "files";
    vmPart.hidden = k !== "vm";
  };
  showKind(kind);
  radios.addEventListener("change", (e) => showKind(e.target.value));
  formDialog({
    title: editing ? `Edit asset ${existing.name}` : "Add an asset",
    description: editing ? null : "An asset is something the appliance protects. After adding it, give it a policy so it is backed up on a schedule.",
    submitLabel: editing ? "Save changes" : "Add asset",
    body: h(
      "div",
      field({ label: "Name", name: "name", value: existing?.name || "", readonly: editing, required: true, placeholder: "file-server", help: editing ? null : "Letters, digits, dots, dashes and underscores." }),
      radios,
      filesPart,
      vmPart,
      field({ label: "Description (optional)", control: h("textarea", { name: "description", rows: 2, text: existing?.description || "" }) }),
    ),
    onSubmit: async (form) => {
      const k = editing ? kind : form.elements.kind.value;
      const body = { description: form.elements.description.value.trim() || null };
      if (k === "files") body.path = form.elements.path.value.trim();
      else {
        body.disks = form.elements.disks.value.split("\n").map((line) => line.trim()).filter(Boolean);
        const spec = form.elements.vm_spec.value.trim();
        if (spec || !editing) body.vm_spec = spec || null;
      }
      if (editing) {
        if (body.description === null) body.description = "";
        await api.put(`/api/assets/${enc(existing.name)}`, body);
        toast(`Asset ${existing.name} saved.`);
      } else {
        const name = form.elements.name.value.trim();
        await api.post("/api/assets", { name, kind: k, ...body });
        toast(`Asset ${name} added. Give it a policy to back it up on a schedule.`);
      }
      done();
    },
  });
}

// --- policy dialog -----------------------------------------------------------------------------------

// A schedule entry whose mode is "boot_test" test-boots the VM's newest point (VM assets only).
const BOOT_TEST_TEXT = "Boot test of the newest point";

function entryRow(entry, onRemove) {
  const cron = h("input", { type: "text", name: "cron", value: entry.cron, class: "mono", "aria-label": "When (cron expression)", required: true, spellcheck: "false" });
  const presetValue = PRESETS.some(([v]) => v === entry.cron) ? entry.cron : "";
  const preset = select("preset", PRESETS, presetValue, { "aria-label": "When" });
  const mode =
    entry.mode === "boot_test"
      ? h("span", { class: "entry-boot-test" }, h("input", { type: "hidden", name: "entry_mode", value: "boot_test" }), pill(BOOT_TEST_TEXT, "info"))
      : select("entry_mode", MODES.map(([v]) => [v, MODE_NAMES[v]]), entry.mode, { "aria-label": "Backup mode of this run" });
  const words = h("p", { class: "help", text: describeCron(entry.cron) });
  preset.addEventListener("change", () => {
    if (preset.value) cron.value = preset.value;
    words.textContent = describeCron(cron.value);
    if (!preset.value) cron.focus();
  });
  cron.addEventListener("input", () => {
    words.textContent = describeCron(cron.value);
    preset.value = PRESETS.some(([v]) => v === cron.value.trim()) ? cron.value.trim() : "";
  });
  const row = h(
    "div",
    { class: "entry" },
    h("div", { class: "entry-controls" }, preset, cron, mode, h("button", { type: "button", class: "icon-btn", "aria-label": "Remove this run", title: "Remove", onClick: () => onRemove(row) }, icon("trash"))),
    words,
  );
  return row;
}

function policyDialog(existing, assets, done, presetAsset = null) {
  const editing = Boolean(existing);
  const schedule = existing?.schedule || { entries: [{ cron: "0 2 * * *", mode: "incremental" }], catch_up: "once" };
  const retention = existing?.retention || { keep_daily: 7, keep_weekly: 4 };
  const rpo = existing ? existing.rpo_seconds : 86400;
  const rpoUnit = rpo && rpo % 86400 === 0 ? 86400 : 3600;
  const entries = h("div", { class: "entries" });
  const removeRow = (row) => row.remove();
  for (const e of schedule.entries) entries.appendChild(entryRow(e, removeRow));
  const addEntry = button("Add a run", { iconName: "plus", kind: "small", onClick: () => entries.appendChild(entryRow({ cron: "0 3 * * 0", mode: "full" }, removeRow)) });
  const assetSelect = select("asset", assets.map((a) => [a.name, `${a.name} (${kindText(a.kind).toLowerCase()})`]), existing?.asset || presetAsset || (assets[0] && assets[0].name));
  const isVm = () => assets.some((a) => a.name === assetSelect.value && a.kind === "vm");
  const addBootTest = button("Add a boot test", { iconName: "plus", kind: "small", title: "Test-boot the VM's newest point on this schedule: its boot is proven, its RTO measured and a screenshot kept", onClick: () => entries.appendChild(entryRow({ cron: "0 5 * * *", mode: "boot_test" }, removeRow)) });
  const showBootTest = () => {
    addBootTest.hidden = !isVm();
  };
  assetSelect.addEventListener("change", showBootTest);
  showBootTest();
  formDialog({
    title: editing ? `Edit policy ${existing.name}` : "Add a protection policy",
    description: editing ? null : "A policy backs up one asset on a schedule, keeps the points its retention says, and watches the RPO target.",
    submitLabel: editing ? "Save changes" : "Add policy",
    wide: true,
    body: h(
      "div",
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Name", name: "name", value: existing?.name || "", readonly: editing, required: true, placeholder: "nightly", help: editing ? null : "Letters, digits, dots, dashes and underscores." }),
        field({ label: "Asset", control: assetSelect }),
      ),
      h(
        "fieldset",
        { class: "field" },
        h("legend", { class: "label", text: "Schedule" }),
        h("p", { class: "help", text: "When backups run (in the appliance's time zone). Several runs can mix modes, e.g. incrementals every hour and a full every Sunday. For a virtual machine, a boot test proves on a schedule that its newest point boots." }),
        entries,
        h("div", { class: "input-row" }, addEntry, addBootTest),
      ),
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Backup mode for “Run now”", control: select("mode", MODES, existing?.mode || "incremental") }),
        field({
          label: "Missed runs",
          control: select("catch_up", [["once", "Run once to catch up"], ["skip", "Skip them"]], schedule.catch_up || "once"),
          help: "What happens to runs missed while the appliance was off.",
        }),
      ),
      h(
        "fieldset",
        { class: "field" },
        h("legend", { class: "label", text: "Retention: points to keep (0: rule not used)" }),
        h(
          "div",
          { class: "grid-3" },
          KEEP.map(([key, label, help]) => field({ label, name: key, type: "number", min: 0, max: 100000, step: 1, value: retention[key] || 0, title: help })),
        ),
        h("p", { class: "help", text: "Points no rule keeps are pruned after each backup of this policy. With every rule at 0, all points are kept." }),
      ),
      h(
        "div",
        { class: "field" },
        h("label", { class: "label", for: "rpo-value", text: "RPO target" }),
        h(
          "div",
          { class: "input-row" },
          h("input", { type: "number", id: "rpo-value", name: "rpo_seconds", min: 0, step: 1, value: rpo ? rpo / rpoUnit : 0, "aria-describedby": "rpo-help" }),
          select("rpo_unit", [["3600", "hours"], ["86400", "days"]], String(rpoUnit), { "aria-label": "RPO unit" }),
        ),
        h("p", { class: "help", id: "rpo-help", text: "The newest good point must never be older than this; the dashboard shows when it is. 0: no target." }),
      ),
    ),
    onSubmit: async (form) => {
      const runs = [...entries.querySelectorAll(".entry")].map((row) => ({ cron: row.querySelector("[name=cron]").value.trim(), mode: row.querySelector("[name=entry_mode]").value }));
      const keep = {};
      for (const [key] of KEEP) keep[key] = Math.max(0, parseInt(form.elements[key].value || "0", 10) || 0);
      const body = {
        asset: form.elements.asset.value,
        mode: form.elements.mode.value,
        schedule: { entries: runs, catch_up: form.elements.catch_up.value },
        retention: keep,
        rpo_seconds: Math.round(Math.max(0, Number(form.elements.rpo_seconds.value || 0)) * Number(form.elements.rpo_unit.value)),
      };
      if (editing) {
        await api.put(`/api/policies/${enc(existing.name)}`, body);
        toast(`Policy ${existing.name} saved.`);
      } else {
        const name = form.elements.name.value.trim();
        await api.post("/api/policies", { name, ...body });
        toast(`Policy ${name} added.`);
      }
      done();
    },
  });
}

// --- the screen --------------------------------------------------------------------------------------

export default async function assetsView(view) {
  const isAdmin = view.can("admin");
  const canRun = view.can("operator");
  const body = h("div", loading());
  const addAsset = isAdmin ? button("Add asset", { iconName: "plus", kind: "primary", onClick: () => assetDialog(null, load) }) : null;
  replace(view.el, pageHeader("Assets & policies", "What the appliance protects, and when and how it backs each one up.", addAsset), body);

  async function startJob(btn, path, what) {
    const job = await busy(btn, view.banner, () => api.post(path, {}));
    if (job) toast(`${what} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  }

  // A failover or boot test: the failover screen follows the job and opens its session.
  async function startFailover(btn, path, what) {
    const job = await busy(btn, view.banner, () => api.post(path, {}));
    if (!job) return;
    toast(`${what} started.`, { link: { href: `#/jobs/${job.id}`, text: "Open the job" } });
    view.navigate(`#/failover?job=${enc(job.id)}`);
  }

  async function load() {
    let assets;
    let policies;
    try {
      [assets, policies] = await Promise.all([api.get("/api/assets"), api.get("/api/policies")]);
    } catch (err) {
      view.banner.error(err);
      replace(body);
      return;
    }
    const assetActions = (a) =>
      h(
        "div",
        { class: "row-actions" },
        canRun ? button("Back up now", { iconName: "play", kind: "small", "aria-label": `Back up ${a.name} now`, onClick: (e) => startJob(e.currentTarget, `/api/assets/${enc(a.name)}/backup`, `Backup of ${a.name}`) }) : null,
        canRun && a.kind === "vm" ? button("Fail over", { kind: "small", "aria-label": `Fail over ${a.name}: boot it from its newest backup on this appliance`, onClick: (e) => startFailover(e.currentTarget, `/api/assets/${enc(a.name)}/failover`, `Failover of ${a.name}`) }) : null,
        canRun && a.kind === "vm" ? button("Boot test", { kind: "small", "aria-label": `Test-boot the newest point of ${a.name}`, onClick: (e) => startFailover(e.currentTarget, `/api/assets/${enc(a.name)}/boot-test`, `Boot test of ${a.name}`) }) : null,
        button("Points", { kind: "small", href: `#/points?asset=${enc(a.name)}`, "aria-label": `Recovery points of ${a.name}` }),
        isAdmin ? h("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": `Edit ${a.name}`, onClick: () => assetDialog(a, load) }, icon("edit")) : null,
        isAdmin
          ? deleteButton({ label: `Delete ${a.name}`, title: `Delete asset ${a.name}?`, text: "The appliance forgets this asset. This is possible only once it has no policies and no recovery points left.", confirmLabel: "Delete asset", path: `/api/assets/${enc(a.name)}`, deleted: `Asset ${a.name} deleted.`, done: load })
          : null,
      );
    const assetsCard = card(
      "Assets",
      { subtitle: "Folders and virtual machines the appliance backs up" },
      assets.length
        ? table(
            [
              { label: "Name", cell: (a) => h("div", { class: "stack" }, h("strong", { text: a.name }), a.description ? h("span", { class: "muted small", text: a.description }) : null) },
              { label: "Kind", cell: (a) => kindText(a.kind), className: "hide-md" },
              { label: "Source", cell: (a) => h("span", { class: "mono small break", text: a.kind === "vm" ? a.disks.join(", ") : a.path }) },
              { label: "Policies", cell: (a) => (a.policies.length ? a.policies.join(", ") : pill("No policy", "warn")) },
              { label: "Actions", cell: assetActions, className: "actions" },
            ],
            assets,
            { caption: "Assets", rowAttrs: (a) => ({ dataset: { asset: a.name } }) },
          )
        : emptyState("assets", "No assets yet", "Add a folder or a virtual machine to protect.", isAdmin ? button("Add asset", { iconName: "plus", kind: "primary", onClick: () => assetDialog(null, load) }) : null),
    );

    const policyActions = (p) =>
      h(
        "div",
        { class: "row-actions" },
        canRun ? button("Run now", { iconName: "play", kind: "small", "aria-label": `Run policy ${p.name} now`, onClick: (e) => startJob(e.currentTarget, `/api/policies/${enc(p.name)}/run`, `Policy ${p.name}`) }) : null,
        isAdmin ? h("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": `Edit policy ${p.name}`, onClick: () => policyDialog(p, assets, load) }, icon("edit")) : null,
        isAdmin
          ? deleteButton({ label: `Delete policy ${p.name}`, title: `Delete policy ${p.name}?`, text: `Backups of ${p.asset} stop running on this schedule. Its recovery points are kept.`, confirmLabel: "Delete policy", path: `/api/policies/${enc(p.name)}`, deleted: `Policy ${p.name} deleted.`, done: load })
          : null,
      );
    const scheduleCell = (p) =>
      p.entries.length
        ? h(
            "ul",
            { class: "plain" },
            p.entries.map((e) => h("li", h("span", { text: `${describeCron(e.cron)} · ${e.mode === "boot_test" ? BOOT_TEST_TEXT : MODE_NAMES[e.mode] || e.mode}` }), e.next_at ? h("span", { class: "muted small block", text: `Next: ${dateTime(e.next_at)}` }) : null)),
          )
        : h("span", { class: "muted", text: "Manual only" });
    const addPolicy = isAdmin && assets.length ? button("Add policy", { iconName: "plus", onClick: () => policyDialog(null, assets, load) }) : null;
    const policiesCard = card(
      "Protection policies",
      { subtitle: "Schedules, retention and RPO targets", actions: addPolicy ? [addPolicy] : [] },
      policies.length
        ? table(
            [
              { label: "Policy", cell: (p) => h("div", { class: "stack" }, h("strong", { text: p.name }), h("span", { class: "muted small", text: `for ${p.asset}` })) },
              { label: "Schedule", cell: scheduleCell },
              { label: "Retention", cell: (p) => retentionText(p.retention), className: "hide-md" },
              { label: "RPO target", cell: (p) => (p.rpo_seconds ? period(p.rpo_seconds) : h("span", { class: "muted", text: "None" })) },
              { label: "Actions", cell: policyActions, className: "actions" },
            ],
            policies,
            { caption: "Protection policies", rowAttrs: (p) => ({ dataset: { policy: p.name } }) },
          )
        : emptyState("points", "No policies yet", assets.length ? "Without a policy, an asset is backed up only when someone presses “Back up now”." : "Add an asset first; then give it a policy.", addPolicy ? button("Add policy", { iconName: "plus", kind: "primary", onClick: () => policyDialog(null, assets, load) }) : null),
    );
    replace(body, assetsCard, policiesCard);
  }

  await load();
}
