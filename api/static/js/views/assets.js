// Assets (what is protected) and protection policies (when, how, how long, RPO).

import { api, enc } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { MODE_NAMES, count, dateTime, describeCron, listText, period } from "../format.js";
import { button, busy, card, emptyState, field, formDialog, loading, pageHeader, pill, select, setApplies, table, toast, deleteButton } from "../ui.js";
import { openFailoverDialog } from "./failover_dialog.js";
import { scheduleControls } from "./schedule_words.js";

const MODES = [
  ["incremental", "Incremental (only changes)"],
  ["full", "Full (everything)"],
  ["differential", "Differential (changes since the last full)"],
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

function assetDialog(existing, done, added = null) {
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
    setApplies(filesPart, k === "files");
    setApplies(vmPart, k === "vm");
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
        if (added) added(name);
      }
      done();
    },
  });
}

// --- policy dialog -----------------------------------------------------------------------------------

// A schedule entry whose mode is "boot_test" test-boots the VM's newest point (VM assets only).
const BOOT_TEST_TEXT = "Boot test of the newest point";

const RPO_UNITS = [
  ["60", "minutes"],
  ["3600", "hours"],
  ["86400", "days"],
];

/** The largest unit that says `seconds` in whole numbers: 86400 -> [1, 86400]; 5400 -> [90, 60]. */
function inUnits(seconds) {
  for (const [unit] of [...RPO_UNITS].reverse()) if (seconds && seconds % Number(unit) === 0) return [seconds / Number(unit), Number(unit)];
  return [seconds ? Math.round(seconds / 60) : 24, seconds ? 60 : 3600];
}

function entryRow(entry, onRemove) {
  const when = scheduleControls(entry.cron);
  const mode =
    entry.mode === "boot_test"
      ? h("span", { class: "entry-boot-test" }, h("input", { type: "hidden", name: "entry_mode", value: "boot_test" }), pill(BOOT_TEST_TEXT, "info"))
      : select("entry_mode", MODES.map(([v]) => [v, MODE_NAMES[v]]), entry.mode, { "aria-label": "Backup mode of this run" });
  const row = h(
    "div",
    { class: "entry", dataset: { mode: entry.mode } },
    h("div", { class: "entry-controls" }, when.el, mode, h("button", { type: "button", class: "icon-btn", "aria-label": "Remove this run", title: "Remove", onClick: () => onRemove(row) }, icon("trash"))),
  );
  row.cron = when.cron;
  return row;
}

/** The checkboxes of the assets a policy covers. */
function assetChoices(assets, chosen) {
  return h(
    "fieldset",
    { class: "field asset-choices" },
    h("legend", { class: "label", text: "Assets" }),
    h("p", { class: "help", text: "The policy backs up each asset you tick, one job each." }),
    h(
      "div",
      { class: "checks" },
      assets.map((a) =>
        h("label", { class: "check" }, h("input", { type: "checkbox", name: "assets", value: a.name, checked: chosen.includes(a.name) }), h("span", { text: `${a.name} (${kindText(a.kind).toLowerCase()})` })),
      ),
    ),
  );
}

function policyDialog(existing, assets, done, { presetAsset = null, timezone = null } = {}) {
  const editing = Boolean(existing);
  const schedule = existing?.schedule || { entries: [{ cron: "0 2 * * *", mode: "incremental" }], catch_up: "once" };
  const retention = existing?.retention || { keep_daily: 7, keep_weekly: 4 };
  const [rpoValue, rpoUnit] = inUnits(existing ? existing.rpo_seconds : 86400);
  const entries = h("div", { class: "entries" });
  const removeRow = (row) => row.remove();
  for (const e of schedule.entries) entries.appendChild(entryRow(e, removeRow));
  const addEntry = button("Add a run", { iconName: "plus", kind: "small", onClick: () => entries.appendChild(entryRow({ cron: "0 3 * * 0", mode: "full" }, removeRow)) });
  const chosen = existing?.assets || [presetAsset || (assets[0] && assets[0].name)].filter(Boolean);
  const assetBox = assetChoices(assets, chosen);
  const picked = () => [...assetBox.querySelectorAll("input[name=assets]:checked")].map((el) => el.value);
  const hasVm = () => assets.some((a) => a.kind === "vm" && picked().includes(a.name));
  const addBootTest = button("Add a boot test", { iconName: "plus", kind: "small", title: "Test-boot each virtual machine's newest point on this schedule: its boot is proven, its RTO measured and a screenshot kept", onClick: () => entries.appendChild(entryRow({ cron: "0 5 * * *", mode: "boot_test" }, removeRow)) });
  const showBootTest = () => {
    addBootTest.hidden = !hasVm();
    addBootTest.disabled = !hasVm();
  };
  assetBox.addEventListener("change", showBootTest);
  showBootTest();
  const zone = timezone ? `in the appliance's time zone, ${timezone}` : "in the appliance's time zone";
  formDialog({
    title: editing ? `Edit policy ${existing.name}` : "Add a protection policy",
    description: editing ? null : "A policy backs up its assets on a schedule, keeps the points its retention says, and watches the RPO target.",
    submitLabel: editing ? "Save changes" : "Add policy",
    wide: true,
    body: h(
      "div",
      field({ label: "Name", name: "name", value: existing?.name || "", readonly: editing, required: true, placeholder: "nightly", help: editing ? null : "Letters, digits, dots, dashes and underscores." }),
      assetBox,
      h(
        "fieldset",
        { class: "field" },
        h("legend", { class: "label", text: "Schedule" }),
        h("p", { class: "help schedule-zone", text: `When backups run (${zone}; change it under Settings). Several runs can mix modes, e.g. incrementals every hour and a full every Sunday. For a virtual machine, a boot test proves on a schedule that its newest point boots.` }),
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
          h("input", { type: "number", id: "rpo-value", name: "rpo_seconds", min: 0, step: 1, value: rpoValue, "aria-describedby": "rpo-help" }),
          select("rpo_unit", RPO_UNITS, String(rpoUnit), { "aria-label": "RPO unit" }),
        ),
        h("p", { class: "help", id: "rpo-help", text: "The newest good point must never be older than this; the dashboard shows when it is. 0: no target." }),
      ),
    ),
    onSubmit: async (form) => {
      const runs = [...entries.querySelectorAll(".entry")].map((row) => ({ cron: row.cron(), mode: row.querySelector("[name=entry_mode]").value }));
      const keep = {};
      for (const [key] of KEEP) keep[key] = Math.max(0, parseInt(form.elements[key].value || "0", 10) || 0);
      const body = {
        assets: picked(),
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
  // The asset added last (on this screen): a new policy covers it unless the person picks others.
  let justAdded = null;
  let offered = false;
  const shownHash = location.hash;
  let timezone = null;
  const added = (name) => {
    justAdded = name;
  };
  const addAsset = isAdmin ? button("Add asset", { iconName: "plus", kind: "primary", onClick: () => assetDialog(null, load, added) }) : null;
  replace(view.el, pageHeader("Assets & policies", "What the appliance protects, and when and how it backs each one up.", addAsset), body);

  async function startJob(btn, path, what) {
    const job = await busy(btn, view.banner, () => api.post(path, {}));
    if (job) toast(`${what} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  }

  async function load() {
    let assets;
    let policies;
    try {
      [assets, policies] = await Promise.all([api.get("/api/assets"), api.get("/api/policies")]);
      if (isAdmin && timezone === null) timezone = (await api.get("/api/settings")).timezone;
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
        canRun && a.kind === "vm" ? button("Fail over", { kind: "small", "aria-label": `Fail over ${a.name}: choose a point and boot it on this appliance`, onClick: () => openFailoverDialog(view, a, "failover") }) : null,
        canRun && a.kind === "vm" ? button("Boot test", { kind: "small", "aria-label": `Test-boot a point of ${a.name}`, onClick: () => openFailoverDialog(view, a, "boot_test") }) : null,
        button("Points", { kind: "small", href: `#/points?asset=${enc(a.name)}`, "aria-label": `Recovery points of ${a.name}` }),
        a.kind === "vm" ? button("Failover settings", { kind: "small", href: `#/assets/${enc(a.name)}/failover-settings`, "aria-label": `Failover settings of ${a.name}: boot proof and network` }) : null,
        isAdmin ? h("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": `Edit ${a.name}`, onClick: () => assetDialog(a, load, added) }, icon("edit")) : null,
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
              {
                label: "Policies",
                cell: (a) =>
                  a.policies.length
                    ? a.policies.join(", ")
                    : h("div", { class: "stack" }, pill("No policy", "warn"), isAdmin ? button("Add policy", { kind: "small", "aria-label": `Add a policy for ${a.name}`, onClick: () => openPolicy(null, a.name) }) : null),
              },
              { label: "Actions", cell: assetActions, className: "actions" },
            ],
            assets,
            { caption: "Assets", rowAttrs: (a) => ({ dataset: { asset: a.name } }) },
          )
        : emptyState("assets", "No assets yet", "Add a folder or a virtual machine to protect.", isAdmin ? button("Add asset", { iconName: "plus", kind: "primary", onClick: () => assetDialog(null, load, added) }) : null),
    );

    const unprotected = assets.filter((a) => !a.policies.length).map((a) => a.name);
    function openPolicy(existing, presetAsset = null) {
      const preset = presetAsset || (justAdded && assets.some((a) => a.name === justAdded) ? justAdded : unprotected[0] || null);
      policyDialog(existing, assets, load, { presetAsset: preset, timezone });
    }
    const policyActions = (p) =>
      h(
        "div",
        { class: "row-actions" },
        canRun ? button("Run now", { iconName: "play", kind: "small", "aria-label": `Run policy ${p.name} now`, onClick: (e) => startJob(e.currentTarget, `/api/policies/${enc(p.name)}/run`, p.assets.length > 1 ? `Policy ${p.name} (${count(p.assets.length, "backup")})` : `Policy ${p.name}`) }) : null,
        isAdmin ? h("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": `Edit policy ${p.name}`, onClick: () => openPolicy(p) }, icon("edit")) : null,
        isAdmin
          ? deleteButton({ label: `Delete policy ${p.name}`, title: `Delete policy ${p.name}?`, text: `Backups of ${listText(p.assets)} stop running on this schedule. ${p.assets.length === 1 ? "Its" : "Their"} recovery points are kept.`, confirmLabel: "Delete policy", path: `/api/policies/${enc(p.name)}`, deleted: `Policy ${p.name} deleted.`, done: load })
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
    const addPolicy = isAdmin && assets.length ? button("Add policy", { iconName: "plus", onClick: () => openPolicy(null) }) : null;
    const policiesCard = card(
      "Protection policies",
      { subtitle: "Schedules, retention and RPO targets", actions: addPolicy ? [addPolicy] : [] },
      policies.length
        ? table(
            [
              { label: "Policy", cell: (p) => h("div", { class: "stack" }, h("strong", { text: p.name }), h("span", { class: "muted small", text: `for ${listText(p.assets)}` })) },
              { label: "Schedule", cell: scheduleCell },
              { label: "Retention", cell: (p) => retentionText(p.retention), className: "hide-md" },
              { label: "RPO target", cell: (p) => (p.rpo_seconds ? period(p.rpo_seconds) : h("span", { class: "muted", text: "None" })) },
              { label: "Actions", cell: policyActions, className: "actions" },
            ],
            policies,
            { caption: "Protection policies", rowAttrs: (p) => ({ dataset: { policy: p.name } }) },
          )
        : emptyState("points", "No policies yet", assets.length ? "Without a policy, an asset is backed up only when someone presses “Back up now”." : "Add an asset first; then give it a policy.", addPolicy ? button("Add policy", { iconName: "plus", kind: "primary", onClick: () => openPolicy(null) }) : null),
    );
    replace(body, assetsCard, policiesCard);
    // `#/assets?add_policy=web` (the dashboard's "Add a policy" fix) opens the dialog for web.
    const wanted = view.query.get("add_policy");
    // Only while this screen is still the one shown: a dialog must not open over the next one.
    if (isAdmin && wanted && !offered && location.hash === shownHash && assets.some((a) => a.name === wanted)) {
      offered = true;
      openPolicy(null, wanted);
    }
  }

  await load();
}
