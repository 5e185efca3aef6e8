// Tape: the libraries (drives, slots, mail slots, barcodes) with load, unload, transfer and
// export; the media pools and their schedules (tape_pools.js); the drives udev found; the tape
// media inventory (where each cartridge is, its pool and set, its place editable); and the tape
// jobs (back up, restore, scan, erase), a waiting one saying which tape it needs and where it is.
//
// Libraries and drives are named by identity (serial:..., virtual:<name>), never by /dev/sgN:
// the appliance resolves the node itself. The screen refreshes every few seconds, so a tape a job
// asks for shows up in the job's words and disappears when it is loaded. An administrator of a
// fresh appliance also finds here the recovery of a lost one from its tapes (tape_recover.js).

import { api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { bytes, capitalise, count, dateTime, shortId } from "../format.js";
import { busy, button, card, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast } from "../ui.js";
import { jobProgress, startedJobs } from "./disks.js";
import { poolsCard } from "./tape_pools.js";
import { recoveryPanel } from "./tape_recover.js";

const REFRESH_MS = 5000;
// While the service restarts (a recovery from tapes switching stores: 503 service_restarting),
// or any read fails while a recovery is under way, the screen asks again this soon, quietly.
const RESTARTING_MS = 1000;
const PLACES = [
  ["library", "In the library"],
  ["shelf", "On the shelf"],
  ["offsite", "Off-site"],
];
const STATE_TONES = { blank: "neutral", writable: "info", full: "good", expired: "warn", retired: "bad" };

function driveWords(d, ctx) {
  if (!d.full) return h("span", { class: "muted", text: "Empty" });
  const parts = [h("strong", { text: d.barcode || "Unlabelled cartridge" })];
  if (d.source_slot) parts.push(h("span", { class: "muted small", text: ` from slot ${d.source_slot}` }));
  return h("div", { class: "stack" }, h("span", parts), driveState(withProbe(d, ctx)));
}

// A drive's own state is read only when asked ("Read drive state"): a drive has one opener at a
// time, and a screen polling it could take it from a job starting at that instant. What was read
// is shown until the cartridge changes.
function withProbe(d, ctx) {
  const read = d.identity ? ctx.probed.get(d.identity) : null;
  if (d.busy || d.state || d.problem || !read || read.barcode !== d.barcode) return d;
  return { ...d, state: read.state, problem: read.problem };
}

function driveState(d) {
  if (d.busy) return pill("In use by a job", "info", "A job holds this drive now.");
  if (d.problem) return h("span", { class: "small warn-text", text: d.problem });
  const s = d.state;
  if (!s) return null;
  return h(
    "div",
    { class: "row-actions" },
    s.write_protected ? pill("Write protected", "warn") : null,
    s.early_warning ? pill("Near the end", "warn") : null,
    h("span", { class: "muted small", text: s.at_bot ? "At the beginning" : s.at_eod ? `At the end of data (file ${s.file_number})` : `File ${s.file_number}, block ${s.block_number}` }),
  );
}

// --- a library -------------------------------------------------------------------------------------

function moveDialog(lib, ctx, { title, description, submitLabel, fields, path, build }) {
  formDialog({
    title,
    description,
    submitLabel,
    body: h("div", fields),
    onSubmit: async (form) => {
      const answer = await api.post(`/api/tape/libraries/${enc(lib.identity)}/${path}`, build(form.elements));
      toast(`${capitalise(answer.message)}.`);
      ctx.refresh();
    },
  });
}

function loadDialog(lib, slot, ctx) {
  const empty = lib.drives.filter((d) => !d.full).map((d) => [d.index, `Drive ${d.index}`]);
  moveDialog(lib, ctx, {
    title: `Load ${slot.barcode || `slot ${slot.number}`}`,
    description: "The robot moves the cartridge into the drive.",
    submitLabel: "Load",
    fields: [field({ label: "Drive", name: "drive", control: select("drive", empty.length ? empty : lib.drives.map((d) => [d.index, `Drive ${d.index}`]), empty.length ? empty[0][0] : 0) })],
    path: "load",
    build: (el) => ({ slot: slot.number, drive: Number(el.drive.value) }),
  });
}

function transferDialog(lib, slot, ctx) {
  const empty = lib.slots.filter((s) => !s.full).map((s) => [s.number, `${s.import_export ? "Mail slot" : "Slot"} ${s.number}`]);
  moveDialog(lib, ctx, {
    title: `Move ${slot.barcode || `slot ${slot.number}`}`,
    description: "The robot moves the cartridge to another slot.",
    submitLabel: "Move",
    fields: [field({ label: "To", name: "destination", control: select("destination", empty, empty.length ? empty[0][0] : "") })],
    path: "transfer",
    build: (el) => ({ source: slot.number, destination: Number(el.destination.value) }),
  });
}

function exportDialog(lib, barcode, ctx) {
  const words = lib.emulated_export
    ? "This library has no mail slot: the cartridge goes to the last empty slot (or the one you choose) and is listed as to be taken out. Its place becomes “on the shelf”, so no job loads it again."
    : "The cartridge goes to a mail slot; take it out there. Its place becomes “on the shelf”, so no job loads it again.";
  const choices = lib.slots.filter((s) => !s.full && s.import_export === !lib.emulated_export).map((s) => [s.number, `${s.import_export ? "Mail slot" : "Slot"} ${s.number}`]);
  moveDialog(lib, ctx, {
    title: `Take ${barcode} out`,
    description: words,
    submitLabel: "Export",
    fields: [field({ label: "Slot", name: "slot", control: select("slot", [["", "Chosen by the appliance"], ...choices], "") })],
    path: "export",
    build: (el) => (el.slot.value ? { barcode, slot: Number(el.slot.value) } : { barcode }),
  });
}

function libraryCard(lib, ctx) {
  const canMove = ctx.view.can("operator") && lib.available;
  const run = (btn, path, body) =>
    busy(btn, ctx.view.banner, async () => {
      const answer = await api.post(`/api/tape/libraries/${enc(lib.identity)}/${path}`, body);
      toast(`${capitalise(answer.message || `${lib.name} checked`)}.`);
      ctx.refresh();
    });
  if (!lib.available) {
    return card(`Library ${lib.name}`, { subtitle: lib.where }, h("p", { class: "banner banner-error", role: "alert", text: lib.problem || "This library cannot be used now." }));
  }
  const drives = table(
    [
      { label: "Drive", cell: (d) => h("div", { class: "stack" }, h("strong", { text: `Drive ${d.index}` }), d.identity ? h("span", { class: "muted small mono", text: d.identity }) : null) },
      { label: "Cartridge", cell: (d) => driveWords(d, ctx) },
      {
        label: "Actions",
        className: "actions",
        cell: (d) => (canMove && d.full ? h("div", { class: "row-actions" }, button("Unload", { kind: "small", "aria-label": `Unload drive ${d.index} of ${lib.name}`, onClick: (e) => run(e.currentTarget, "unload", { drive: d.index }) }), d.barcode ? button("Export", { kind: "small", "aria-label": `Export ${d.barcode}`, onClick: () => exportDialog(lib, d.barcode, ctx) }) : null) : null),
      },
    ],
    lib.drives,
    { caption: `Drives of ${lib.name}`, rowAttrs: (d) => ({ dataset: { drive: String(d.index), barcode: d.barcode || "" } }) },
  );
  const slots = table(
    [
      { label: "Slot", cell: (s) => h("div", { class: "row-actions" }, h("strong", { text: String(s.number) }), s.import_export ? pill("Mail slot", "info", "An import/export slot: cartridges go in and out of the library here.") : null) },
      {
        label: "Cartridge",
        cell: (s) => (s.full ? h("div", { class: "row-actions" }, h("span", { class: "mono", text: s.barcode || "Unlabelled" }), s.to_take_out ? pill("To be taken out", "warn", "Exported: take this cartridge out of the library.") : null) : h("span", { class: "muted", text: "Empty" })),
      },
      {
        label: "Actions",
        className: "actions",
        cell: (s) =>
          canMove && s.full
            ? h(
                "div",
                { class: "row-actions" },
                button("Load…", { kind: "small", "aria-label": `Load slot ${s.number} of ${lib.name}`, onClick: () => loadDialog(lib, s, ctx) }),
                button("Move…", { kind: "small", "aria-label": `Move slot ${s.number} of ${lib.name}`, onClick: () => transferDialog(lib, s, ctx) }),
                s.barcode && !s.import_export && !s.to_take_out ? button("Export", { kind: "small", "aria-label": `Export ${s.barcode}`, onClick: () => exportDialog(lib, s.barcode, ctx) }) : null,
              )
            : null,
      },
    ],
    lib.slots,
    { caption: `Slots of ${lib.name}`, rowAttrs: (s) => ({ dataset: { slot: String(s.number), barcode: s.barcode || "" } }) },
  );
  const readDrives = button("Read drive state", {
    "aria-label": `Read the drives of ${lib.name}`,
    title: "Open the idle drives that hold a cartridge and ask them (write protection, position)",
    onClick: (e) => busy(e.currentTarget, ctx.view.banner, () => ctx.probe()),
  });
  const actions = [lib.drives.some((d) => d.full) ? readDrives : null, canMove ? button("Check slots", { iconName: "refresh", "aria-label": `Check the slots of ${lib.name}`, onClick: (e) => run(e.currentTarget, "inventory", undefined) }) : null].filter(Boolean);
  const full = lib.slots.filter((s) => s.full).length;
  return card(
    `Library ${lib.name}`,
    { subtitle: `${lib.kind === "virtual" ? "Virtual library" : "Tape library"} · ${lib.where} · ${count(full, "cartridge")} in ${count(lib.slots.length, "slot")}${lib.emulated_export ? " · no mail slot" : ""}`, actions },
    h("div", { class: "library", dataset: { library: lib.identity } }, drives, slots),
  );
}

// --- drives udev found --------------------------------------------------------------------------

function drivesCard(drives, ctx) {
  if (!drives.length) return null;
  const stateCell = (d) => {
    const seen = withProbe({ ...d, barcode: null }, ctx);
    if (seen.busy || seen.problem) return driveState(seen);
    if (!seen.state) return h("span", { class: "muted", text: "Not read yet" });
    return seen.state.loaded ? driveState(seen) : h("span", { class: "muted", text: "No cartridge" });
  };
  const read = button("Read drive state", { "aria-label": "Read the tape drives", onClick: (e) => busy(e.currentTarget, ctx.view.banner, () => ctx.probe()) });
  return card(
    "Tape drives",
    { subtitle: "Drives the appliance found (Linux st driver), keyed by their serial.", actions: [read] },
    table(
      [
        { label: "Drive", cell: (d) => h("div", { class: "stack" }, h("strong", { text: [d.vendor, d.model].filter(Boolean).join(" ") || "Tape drive" }), h("span", { class: "muted small mono", text: `${d.identity} · ${d.devnode}` })) },
        { label: "State", cell: stateCell },
      ],
      drives,
      { caption: "Tape drives", rowAttrs: (d) => ({ dataset: { tapeDrive: d.identity } }) },
    ),
  );
}

// --- media --------------------------------------------------------------------------------------

function placeControl(m, ctx) {
  if (!ctx.view.can("operator")) return h("span", { text: (PLACES.find(([v]) => v === m.place) || [m.place, m.place])[1] });
  const control = select("place", PLACES, m.place, { "aria-label": `Place of ${m.barcode}` });
  control.addEventListener("change", () =>
    busy(control, ctx.view.banner, async () => {
      await api.put(`/api/tape/media/${enc(m.barcode)}/place`, { place: control.value });
      toast(`Tape ${m.barcode}: ${PLACES.find(([v]) => v === control.value)[1].toLowerCase()}.`);
      ctx.refresh();
    }),
  );
  return control;
}

function mediaCard(media, ctx) {
  const rows = table(
    [
      { label: "Tape", cell: (m) => h("div", { class: "stack" }, h("strong", { class: "mono", text: m.barcode }), m.write_protected ? pill("Write protected", "warn") : null) },
      { label: "Pool", cell: (m) => m.pool || h("span", { class: "muted", text: "—" }) },
      { label: "Set", cell: (m) => (m.media_set_id ? `${shortId(m.media_set_id)} #${m.sequence ?? "?"}` : h("span", { class: "muted", text: "—" })), className: "hide-md" },
      { label: "State", cell: (m) => pill(capitalise(m.state), STATE_TONES[m.state] || "neutral") },
      { label: "Where", cell: (m) => h("div", { class: "stack" }, placeControl(m, ctx), m.located ? h("span", { class: "muted small", text: m.located }) : null, m.to_take_out ? pill("To be taken out", "warn") : null) },
      { label: "Points", cell: (m) => count(m.point_count, "point"), className: "num" },
      { label: "Written", cell: (m) => (m.last_written_at ? h("div", { class: "stack" }, h("span", { text: dateTime(m.last_written_at) }), h("span", { class: "muted small", text: bytes(m.bytes_written) })) : h("span", { class: "muted", text: "Never" })), className: "hide-md" },
    ],
    media,
    { caption: "Tape media", rowAttrs: (m) => ({ dataset: { medium: m.barcode, place: m.place } }) },
  );
  return card(
    "Tape media",
    { subtitle: "Every cartridge the appliance has written or seen: its pool and set, and where it is (in the library, on the shelf, off-site)." },
    media.length ? rows : emptyState("disk", "No tape known yet", "Tapes appear here when a backup writes them or a scan reads them."),
  );
}

// --- jobs -------------------------------------------------------------------------------------------

function driveChoices(overview) {
  const found = [];
  for (const lib of overview.libraries) for (const d of lib.drives) if (d.identity) found.push([d.identity, `${lib.name} drive ${d.index}${d.barcode ? ` (${d.barcode})` : ""}`]);
  for (const d of overview.drives) found.push([d.identity, `${[d.vendor, d.model].filter(Boolean).join(" ") || "Tape drive"} ${d.devnode}`]);
  return found;
}

function jobDialog(kind, overview, ctx) {
  const drives = driveChoices(overview);
  const driveField = field({ label: "Drive", name: "drive", control: select("drive", drives, drives.length ? drives[0][0] : "") });
  const specs = {
    tape_backup: {
      title: "Back up to tape",
      description: "Write points to a tape media pool. A tape that is not in a drive is loaded from the library, or the job waits and says which tape it needs.",
      fields: [
        overview.pools.length
          ? field({ label: "Media pool", control: select("pool", overview.pools.map((p) => [p.name, p.name]), overview.pools[0].name) })
          : field({ label: "Media pool", name: "pool", required: true, placeholder: "weekly", help: "No pool yet: create one under “Media pools” first." }),
        field({ label: "Points", name: "points", placeholder: "newest", help: "Point ids separated by commas, or “newest” for the newest points of the pool's rule." }),
      ],
      body: (el) => {
        const raw = el.points.value.trim();
        const points = !raw || raw === "newest" ? "newest" : raw.split(/[\s,]+/).filter(Boolean);
        return { pool: el.pool.value.trim(), points, drive: el.drive.value };
      },
      path: "/api/tape/backup",
      label: "Tape backup",
    },
    tape_restore: {
      title: "Restore from tape",
      description: "Read what a point needs from its tapes back into the appliance; restore or boot it afterwards as usual.",
      fields: [
        field({ label: "Point", name: "point", required: true, placeholder: "Point id" }),
        field({ label: "Only this path (optional)", name: "path", placeholder: "reports/2026", help: "Empty: the whole point comes back. A path is read aside; restore it with “restore --from” the set." }),
      ],
      body: (el) => {
        const body = { point: el.point.value.trim(), drive: el.drive.value };
        if (el.path.value.trim()) body.path = el.path.value.trim();
        return body;
      },
      path: "/api/tape/restore",
      label: "Restore from tape",
    },
    tape_scan: {
      title: "Scan tapes",
      description: "Read the labels and set catalogs of the tapes and rebuild the appliance's records of them (after a reinstall, or for tapes from elsewhere).",
      fields: [],
      body: (el) => ({ drive: el.drive.value }),
      path: "/api/tape/scan",
      label: "Tape scan",
    },
    tape_erase: {
      title: "Erase a tape",
      description: "Everything on the tape is lost; it becomes blank and may be written again.",
      fields: [field({ label: "Tape barcode", name: "barcode", required: true })],
      body: (el) => ({ barcode: el.barcode.value.trim(), drive: el.drive.value }),
      path: "/api/tape/erase",
      label: "Tape erase",
      danger: true,
    },
  };
  const spec = specs[kind];
  formDialog({
    title: spec.title,
    description: spec.description,
    submitLabel: spec.title,
    danger: Boolean(spec.danger),
    body: h("div", spec.fields, driveField),
    onSubmit: async (form) => {
      await ctx.jobs.submit(spec.path, spec.body(form.elements), spec.label);
      ctx.refresh();
    },
  });
}

// A waiting job names the tape it needs ("needs tape DEMO02L8 in drive ..."): say where that
// tape is, as the media list knows it (a library slot, the shelf, off-site).
function whereIsTape(reason, media) {
  const found = /needs tape (\S+)|\(tape (\S+) would do\)/.exec(reason || "");
  if (!found) return null;
  const barcode = found[1] || found[2];
  const m = media.find((x) => x.barcode === barcode);
  if (!m) return `Tape ${barcode} is not known to this appliance.`;
  if (m.located) return `Tape ${m.barcode} is in ${m.located}${m.to_take_out ? " (exported: to be taken out)" : ""}.`;
  const place = (PLACES.find(([v]) => v === m.place) || [m.place, m.place])[1].toLowerCase();
  return `Tape ${m.barcode} is ${place}: put it in the library.`;
}

function jobsCard(overview, active, ctx) {
  const kinds = overview.job_kinds;
  const words = { tape_backup: "Back up to tape…", tape_restore: "Restore from tape…", tape_scan: "Scan tapes…", tape_erase: "Erase a tape…" };
  const allowed = (k) => (k === "tape_erase" ? ctx.view.can("admin") : ctx.view.can("operator"));
  const actions = kinds.filter(allowed).map((k) => button(words[k], { kind: k === "tape_erase" ? "danger" : "", onClick: () => jobDialog(k, overview, ctx) }));
  const list = active.length
    ? h(
        "ul",
        { class: "fo-jobs plain" },
        active.map((job) => h("li", { class: "fo-job", dataset: { job: job.id, state: job.state } }, h("div", { class: "fo-job-head" }, h("a", { href: `#/jobs/${enc(job.id)}`, text: capitalise(job.description || job.kind) }), job.state === "waiting" ? pill(job.wait_reason ? capitalise(job.wait_reason) : "Waiting", "warn") : pill(capitalise(job.state), "info")), job.state === "waiting" && whereIsTape(job.wait_reason, overview.media) ? h("p", { class: "small tape-where", text: whereIsTape(job.wait_reason, overview.media) }) : null, jobProgress(job))),
      )
    : h("p", { class: "muted", text: kinds.length ? "No tape job is running or waiting." : "This appliance runs no tape jobs yet." });
  return card("Tape jobs", { subtitle: "A job that needs a tape which is not in a drive waits and says which one: put it in the library.", actions }, list);
}

// --- the screen ---------------------------------------------------------------------------------

function registerDialog(ctx) {
  formDialog({
    title: "Register a virtual library",
    description: "A directory holding a virtual tape library (made by the demo or by hardware.tape.library.create_virtual_library).",
    submitLabel: "Register",
    body: h("div", field({ label: "Directory", name: "path", required: true, placeholder: "/var/lib/appliance/tape/demo" })),
    onSubmit: async (form) => {
      const lib = await api.post("/api/tape/libraries", { path: form.elements.path.value.trim() });
      toast(`Library ${lib.name} registered.`);
      ctx.refresh();
    },
  });
}

function createDialog(ctx) {
  formDialog({
    title: "New virtual library",
    description: "A library of file-backed cartridges in the appliance's data directory, for trying tape without a drive (the demo) or for tests.",
    submitLabel: "Create library",
    body: h(
      "div",
      field({ label: "Name", name: "name", required: true, value: "demo", maxlength: 32, help: "Letters, digits, “_”, “.”, “-”; barcodes are made from it (DEMO001, …)." }),
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Slots", name: "slots", type: "number", min: 1, max: 100, value: 8 }),
        field({ label: "Mail slots", name: "import_export", type: "number", min: 0, max: 4, value: 1, help: "0: exports are emulated." }),
        field({ label: "Drives", name: "drives", type: "number", min: 1, max: 4, value: 1 }),
        field({ label: "Cartridges", name: "cartridges", type: "number", min: 0, max: 100, value: 4 }),
        field({ label: "Capacity of each (MiB)", name: "capacity_mib", type: "number", min: 1, value: 512 }),
      ),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const body = { name: el.name.value.trim() };
      for (const key of ["slots", "import_export", "drives", "cartridges", "capacity_mib"]) body[key] = Number(el[key].value);
      const lib = await api.post("/api/tape/libraries/virtual", body);
      toast(`Library ${lib.name} created with ${count(lib.slots.filter((s) => s.full).length, "cartridge")}.`);
      ctx.refresh();
    },
  });
}

export default async function tapeView(view) {
  const body = h("div", loading());
  const jobs = startedJobs(view, { onEnd: () => refresh() });
  const add = view.can("admin")
    ? [button("New virtual library…", { iconName: "plus", onClick: () => createDialog(ctx) }), button("Register a virtual library…", { onClick: () => registerDialog(ctx) })]
    : [];
  replace(view.el, pageHeader("Tape", "Libraries, drives and cartridges; writing points to tape and reading them back.", ...add), jobs.el, body);
  let timer = null;
  let stopped = false;
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });
  const ctx = {
    view,
    jobs,
    refresh: () => refresh(),
    probed: new Map(),
    async probe() {
      const read = await api.get("/api/tape?probe=1");
      for (const lib of read.libraries) for (const d of lib.drives) if (d.identity && d.full && !d.busy) ctx.probed.set(d.identity, { barcode: d.barcode, state: d.state, problem: d.problem });
      for (const d of read.drives) if (!d.busy) ctx.probed.set(d.identity, { barcode: null, state: d.state, problem: d.problem });
      await refresh();
    },
    overview: null,
    restoreFromTape: () => ctx.overview && jobDialog("tape_restore", ctx.overview, ctx),
  };
  const recovery = view.can("admin") ? recoveryPanel(ctx) : null;

  async function refresh() {
    clearTimeout(timer);
    let overview;
    let active;
    let rec = null;
    try {
      let pools;
      [overview, active, pools, rec] = await Promise.all([api.get("/api/tape"), api.get("/api/tape/jobs"), api.get("/api/tape/pools"), recovery ? api.get("/api/tape/recover") : null]);
      overview = { ...overview, pools };
    } catch (err) {
      if (stopped) return;
      if (err.code === "service_restarting" || (recovery && recovery.busy() && err.status >= 500)) timer = setTimeout(refresh, RESTARTING_MS);
      else view.banner.error(err);
      return;
    }
    if (stopped) return;
    ctx.overview = overview;
    if (recovery) recovery.show(rec, driveChoices(overview));
    // Redraw unless a dialog is open over the screen (its form would lose what was typed).
    if (!document.querySelector("dialog[open]")) {
      const libraries = overview.libraries.length
        ? overview.libraries.map((lib) => libraryCard(lib, ctx))
        : [card("Libraries", {}, emptyState("disk", "No tape library", "Connect a tape library (found by itself), or register a virtual one."))];
      replace(body, recovery ? recovery.el : null, jobsCard(overview, active, ctx), poolsCard(overview.pools, driveChoices(overview), ctx), ...libraries, drivesCard(overview.drives, ctx), mediaCard(overview.media, ctx));
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }
  await refresh();
}
