// Recovery points: the list per asset, and restore / verify / delete of a point.

import { ApiError, api, enc, humanError, q, scoped } from "../api.js";
import { h, replace } from "../dom.js";
import { LOCATION_NAMES, MODE_NAMES, ago, bytes, count, dateTime, secondsSince, shortId } from "../format.js";
import { button, busy, card, confirmDialog, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast, deleteButton } from "../ui.js";
import { money } from "./tiering.js";

export function pointStatus(p) {
  if (p.status !== "complete") return pill(p.status === "partial" ? "Incomplete" : p.status, "warn");
  if (p.verify_status === "damaged") return pill("Damaged", "bad", p.verified_at ? `Verified ${dateTime(p.verified_at)}` : null);
  if (p.verify_status === "ok") return pill("Verified", "good", `Verified ${dateTime(p.verified_at)}`);
  return pill("Complete", "neutral", "Not verified yet");
}

/** A backup that looks like ransomware at work: why, whether a person looked, and (for an
 * operator) the two answers. Until someone says it was expected, retention keeps this point and
 * the last clean one before it. */
export function suspicionBlock(p, { canReview = false, done = null } = {}) {
  if (!p.suspicion || !p.suspicion.length) return null;
  const review = p.review;
  let state;
  if (!review) state = pill("Suspicious", "bad", "This backup looks like ransomware at work");
  else if (review.verdict === "attack") state = pill("Attack confirmed", "bad", `Confirmed by ${review.by} ${dateTime(review.at)}`);
  else state = pill("Looked at", "neutral", `${review.by} found the changes expected (${dateTime(review.at)})`);
  const note = !review
    ? "Older backups are kept until someone looks."
    : review.verdict === "attack"
      ? `${review.by} confirmed an attack. This point and the last clean one before it are kept.`
      : `${review.by} found the changes expected.`;
  const answer = (verdict, label, text) =>
    button(label, {
      kind: "small",
      "aria-label": `${label}: point ${shortId(p.id)}`,
      onClick: () =>
        confirmDialog({
          title: label,
          text,
          confirmLabel: label,
          danger: verdict === "attack",
          action: async () => {
            await api.post(`/api/points/${enc(p.id)}/review`, { verdict });
            toast(verdict === "expected" ? "Marked as expected. Retention goes on as usual." : "Marked as an attack. The last clean backup stays kept.");
            if (done) done();
          },
        }),
    });
  const buttons =
    canReview && (!review || review.verdict === "attack")
      ? h(
          "div",
          { class: "row-actions" },
          review ? null : answer("attack", "It is an attack", "The files really were encrypted or destroyed. This backup and the last clean one before it stay kept until you say otherwise. Restore from the clean one."),
          answer("expected", "It was expected", "The changes were made on purpose (for example many files renamed or compressed). The warning ends and old backups are removed by the usual rules again."),
        )
      : null;
  return h(
    "div",
    { class: "suspicion", dataset: { suspicion: p.id } },
    state,
    h("ul", { class: "suspicion-reasons" }, p.suspicion.map((reason) => h("li", { text: `${reason[0].toUpperCase()}${reason.slice(1)}.` }))),
    h("p", { class: "muted small", text: note }),
    buttons,
  );
}

export function pointTitle(p) {
  return `${p.asset} · ${dateTime(p.created_at)}`;
}

function radioChoice(name, value, label, help, { checked = false, disabled = false } = {}) {
  return h(
    "label",
    { class: ["radio", "fo-radio", disabled ? "is-disabled" : ""], dataset: { choice: value } },
    h("input", { type: "radio", name, value, checked, disabled }),
    h("span", h("strong", { text: label }), help ? h("small", { class: "muted", text: help }) : null),
  );
}

function stamp(iso) {
  return iso.replace(/[-:]/g, "").replace("T", "-").slice(0, 13);
}

const COPY_STATES = {
  present: ["Present", "good", "Readable now."],
  archived: ["Archived", "info", "In cold storage: a restore first recalls its data (minutes to hours)."],
  recalling: ["Recalling", "info", "Its data is being recalled from cold storage."],
  copying: ["Copying", "neutral", "Not complete yet."],
  lost: ["Lost", "bad", "Damaged or missing where it was kept."],
  deleted: ["Deleted", "neutral", "No longer kept there."],
};

/** A point's copies: where each lives, its state, and for a locked copy until when it is
 * protected. */
export function copiesList(copies) {
  if (!copies.length) return h("p", { class: "muted", text: "No copy recorded." });
  return h(
    "ul",
    { class: "copies" },
    copies.map((c) => {
      const [label, tone, title] = COPY_STATES[c.state] || [c.state, "neutral", null];
      const notes = [];
      if (c.storage_class) notes.push(c.storage_class);
      if (c.retain_until) notes.push(`protected until ${dateTime(c.retain_until)}`);
      if (c.verified_at) notes.push(`verified ${ago(secondsSince(c.verified_at))}`);
      if (!c.online) notes.push("location unavailable now");
      return h(
        "li",
        { dataset: { copy: c.location } },
        h("strong", { text: c.location }),
        h("span", { class: "muted", text: ` ${LOCATION_NAMES[c.location_kind] || c.location_kind} ` }),
        pill(label, tone, title),
        notes.length ? h("span", { class: "muted small", text: ` ${notes.join(" · ")}` }) : null,
      );
    }),
  );
}

/** Readable copies are all cold: a restore first recalls the point's data. */
export function onlyCold(copies) {
  const readable = copies.filter((c) => ["present", "archived", "recalling"].includes(c.state));
  return readable.length > 0 && !readable.some((c) => c.state === "present" && c.online) && readable.some((c) => c.state !== "present");
}

/** What the recall costs, by the dated prices the appliance estimates from (Tiering). */
function recallCost(e) {
  const dated = e.prices_as_of ? ` (prices of ${e.prices_as_of})` : "";
  if (e.cost === null || e.cost === undefined) return e.storage_class ? ` No price is known for a recall from ${e.storage_class} at tier ${e.tier}.` : "";
  return ` Estimated cost of the recall: ${money(e.cost, e.currency || "USD")}${dated}.`;
}

function recallWords(e) {
  const what = e.path ? `this restore of ${e.path}` : "this restore";
  const where = `${e.location}${e.address ? ` (${e.address})` : ""}`;
  if (e.reason) return `The point is only in cold storage: ${what} first recalls its data from ${where}, tier ${e.tier}, typically ${e.typical_wait || "hours"}. The bucket cannot be looked at now: ${e.reason}.`;
  const started = e.copy_state === "recalling" ? " A recall is already under way." : "";
  return `This restore first recalls ${count(e.packs, "pack")} (${bytes(e.bytes)}) from ${where}, tier ${e.tier}, typically ${e.typical_wait || "hours"}.${recallCost(e)} It waits meanwhile (shown under Jobs as waiting, with the reason) and goes on by itself.${started}`;
}

/** Restore a point (or one path / disk of it). The choices are exactly the safe targets the
 * appliance allows: a download, a folder in a restore area, the asset's own source in place
 * (overwrite or keep both, confirmed), or a registered restore device for VM points. */
export async function restoreDialog(point, { path = "", onStarted = null } = {}) {
  let disks = [];
  let choices;
  let detail;
  try {
    [choices, detail] = await Promise.all([api.get(`/api/points/${enc(point.id)}/restore-targets`), api.get(`/api/points/${enc(point.id)}`)]);
    if (point.kind === "image") disks = detail.manifest.disks || [];
  } catch (err) {
    toast(humanError(err).text, { kind: "error" });
    return;
  }
  const cold = onlyCold(detail.copies || []);
  const isFiles = point.kind === "files";
  const options = [];
  if (choices.download) {
    options.push(
      cold
        ? radioChoice("destination", "download", "Download", "Not while the point is only in cold storage: restore it into a restore area instead.", { disabled: true })
        : radioChoice("destination", "download", "Download", "A tar or zip archive, straight to this browser."),
    );
  }
  options.push(radioChoice("destination", "area", "Into a restore area", `A new folder in ${choices.areas.join(", ")}.`, { checked: true }));
  options.push(
    radioChoice("destination", "source", "Back to where it came from", choices.source ? `Over ${choices.source}, in place.` : choices.source_unavailable, { disabled: !choices.source }),
  );
  if (!isFiles) {
    const usable = choices.devices.filter((d) => !d.unavailable);
    options.push(radioChoice("destination", "device", "Onto a restore device", usable.length ? "A block device or image file an administrator registered." : "No usable restore device is registered (Settings).", { disabled: !usable.length }));
  }
  const where = h("fieldset", { class: "field" }, h("legend", { class: "label", text: "Restore to" }), options);

  const folder = `${point.asset}-${stamp(point.created_at)}`;
  const areaPart = h(
    "div",
    { class: "grid-2", dataset: { part: "area" } },
    field({ label: "Restore area", control: select("area", choices.areas.map((a) => [a, a]), choices.areas[0]) }),
    field({ label: isFiles ? "New folder" : "Folder or image file", name: "folder", value: folder, help: "Inside the restore area; created if needed." }),
  );
  const sourcePart = h(
    "fieldset",
    { class: "field", dataset: { part: "source" }, hidden: true },
    h("legend", { class: "label", text: "What is there now" }),
    radioChoice("on_conflict", "keep_both", "Keep both", "Files in the way are renamed (name.before-restore-<time>); nothing is lost."),
    radioChoice("on_conflict", "overwrite", "Overwrite", "Files in the way are replaced by the point's version."),
    h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "confirm_source" }), h("span", { text: `I understand this writes into ${choices.source || "the source"} on the live system.` })),
  );
  const devicePart = isFiles
    ? null
    : h(
        "div",
        { dataset: { part: "device" }, hidden: true },
        field({
          label: "Restore device",
          control: select(
            "device",
            choices.devices.map((d) => [d.path, d.unavailable ? `${d.path} (unavailable: ${d.unavailable})` : `${d.path}${d.size ? ` (${bytes(d.size)})` : ""}`]),
            (choices.devices.find((d) => !d.unavailable) || {}).path || "",
          ),
        }),
      );
  const downloadPart = isFiles
    ? h("div", { class: "grid-2", dataset: { part: "download" }, hidden: true }, field({ label: "Archive", control: select("archive", [["tar", "tar"], ["zip", "zip"]], "tar") }))
    : null;
  const what = isFiles
    ? field({ label: "Only this file or folder (optional)", name: "path", value: path, placeholder: "everything", help: "A path inside the point, e.g. docs/report.pdf. Empty: the whole point." })
    : h(
        "div",
        { class: "grid-2" },
        field({ label: "Disk", control: select("disk", [["", "All disks"], ...disks.map((d) => [d.name, `${d.name} (${bytes(d.size)})`])], "") }),
        field({ label: "Image format", control: select("format", [["raw", "Raw"], ["qcow2", "QCOW2"], ["vmdk", "VMDK"], ["vhdx", "VHDX"], ["vdi", "VDI"]], "raw") }),
      );
  const parts = [areaPart, sourcePart, devicePart, downloadPart].filter(Boolean);
  // A point only in cold storage: the restore first recalls its data. What it would recall is
  // shown (GET .../recall asks for nothing) before the restore is confirmed.
  const recallNote = h("div", { class: "recall-note", role: "status", hidden: true });
  const coldNote = cold ? h("p", { class: "muted small", text: "Its readable copies are all in cold storage: a restore first recalls the data it needs." }) : null;
  const body = h("div", coldNote, what, where, parts, recallNote);
  let confirmed = null; // the selection whose recall estimate was shown
  where.addEventListener("change", () => {
    const chosen = where.querySelector("input:checked").value;
    for (const part of parts) part.hidden = part.dataset.part !== chosen;
  });
  formDialog({
    title: "Restore",
    description: `From the point of ${point.asset} made ${dateTime(point.created_at)} (${ago(secondsSince(point.created_at))}). A restore runs as a job.`,
    submitLabel: "Start restore",
    wide: true,
    body,
    onSubmit: async (form) => {
      const destination = where.querySelector("input:checked").value;
      const selected = isFiles ? form.elements.path.value.trim() : "";
      if (destination === "download") {
        const params = new URLSearchParams({ format: form.elements.archive.value });
        if (selected) params.set("path", selected);
        window.location.assign(scoped(`/api/points/${enc(point.id)}/download?${params}`));
        return;
      }
      let estimate = null;
      if (cold) {
        const key = `${destination}|${selected}`;
        estimate = await api.get(q(`/api/points/${enc(point.id)}/recall`, { path: selected }));
        if (estimate.needed && confirmed !== key) {
          confirmed = key;
          replace(recallNote, h("div", { class: "banner banner-warning", role: "note" }, h("div", { class: "banner-body", text: recallWords(estimate) })));
          recallNote.hidden = false;
          recallNote.scrollIntoView({ block: "nearest" });
          form.querySelector("button[type=submit]").textContent = "Recall and restore";
          return false; // the dialog stays: the next click confirms
        }
      }
      const req = { destination };
      if (isFiles) {
        if (selected) req.path = selected;
      } else {
        if (form.elements.disk.value) req.disk = form.elements.disk.value;
        req.format = form.elements.format.value;
      }
      if (destination === "area") {
        const name = form.elements.folder.value.trim().replace(/^\/+/, "");
        if (!name || name.split("/").includes("..")) throw new ApiError(400, "invalid_input", "name a new folder inside the restore area", { field: "folder" });
        req.target = `${form.elements.area.value.replace(/\/+$/, "")}/${name}`;
      } else if (destination === "source") {
        const conflict = form.querySelector("input[name=on_conflict]:checked");
        if (!conflict) throw new ApiError(400, "invalid_input", "choose what happens to the files there now: keep both or overwrite", { field: "on_conflict" });
        if (!form.elements.confirm_source.checked) throw new ApiError(400, "invalid_input", "confirm that the restore writes into the live source", { field: "confirm_source" });
        req.on_conflict = conflict.value;
      } else if (destination === "device") {
        req.target = form.elements.device.value;
      }
      const job = await api.post(`/api/points/${enc(point.id)}/restore`, req);
      const shown = req.target || choices.source;
      const waits = estimate && estimate.needed ? ` It waits while ${count(estimate.packs, "pack")} ${estimate.packs === 1 ? "is" : "are"} recalled from ${estimate.location} (typically ${estimate.typical_wait || "hours"}).` : "";
      toast(`Restore to ${shown} started.${waits}`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
      if (onStarted) onStarted(job);
    },
  });
}

/** Copy a point to another location: only what the location lacks moves; runs as a job. */
export async function copyDialog(point) {
  let locations;
  let detail;
  try {
    [locations, detail] = await Promise.all([api.get("/api/locations"), api.get(`/api/points/${enc(point.id)}`)]);
    locations = locations.filter((l) => !l.home);
  } catch (err) {
    toast(humanError(err).text, { kind: "error" });
    return;
  }
  if (!locations.length) {
    toast("There is no other location yet: an administrator adds one under Pools.", { kind: "error" });
    return;
  }
  formDialog({
    title: "Copy to another location",
    description: `The point of ${point.asset} made ${dateTime(point.created_at)}. Only the data the location lacks is copied; every pack is read back and checked.`,
    submitLabel: "Start copy",
    body: h(
      "div",
      h("h3", { class: "label", text: "Copies now" }),
      copiesList(detail.copies || []),
      field({ label: "Location", control: select("location", locations.map((l) => [l.id, `${l.label}${l.access === "cold" ? " (cold)" : ""}${l.immutable ? " (locked)" : ""}${l.online ? "" : " (unavailable)"}`]), locations[0].id) }),
    ),
    onSubmit: async (form) => {
      const job = await api.post(`/api/points/${enc(point.id)}/copy`, { location: form.elements.location.value });
      toast("Copy started.", { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
    },
  });
}

export async function verifyPoint(point, btn, banner) {
  const job = await busy(btn, banner, () => api.post(`/api/points/${enc(point.id)}/verify`, {}));
  if (job) toast("Verification started.", { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
}

export default async function pointsView(view) {
  const asset = view.query.get("asset") || "";
  const body = h("div", loading());
  const picker = h("div", { class: "toolbar" });
  replace(view.el, pageHeader("Recovery points", "Every backup makes a recovery point. Browse one to download files, or restore it."), picker, body);

  let assets = [];
  let points = [];
  try {
    [assets, points] = await Promise.all([api.get("/api/assets"), api.get(q("/api/points", { asset, limit: 500 }))]);
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  const chooser = select("asset", [["", "All assets"], ...assets.map((a) => [a.name, a.name])], asset, { id: "points-asset" });
  chooser.addEventListener("change", () => view.navigate(chooser.value ? `#/points?asset=${enc(chooser.value)}` : "#/points"));
  replace(picker, h("label", { for: "points-asset", class: "label inline", text: "Asset" }), chooser, h("span", { class: "muted", text: count(points.length, "point") }));

  const canRun = view.can("operator");
  const isAdmin = view.can("admin");
  const actions = (p) =>
    h(
      "div",
      { class: "row-actions" },
      p.kind === "files" ? button("Browse", { kind: "small", href: `#/points/${enc(p.id)}`, "aria-label": `Browse point ${shortId(p.id)}` }) : null,
      canRun ? button("Restore", { iconName: "restore", kind: "small", onClick: () => restoreDialog(p) }) : null,
      canRun ? button("Verify", { iconName: "check", kind: "small", onClick: (e) => verifyPoint(p, e.currentTarget, view.banner) }) : null,
      canRun ? button("Copy…", { kind: "small", "aria-label": `Copy point ${shortId(p.id)}`, onClick: () => copyDialog(p) }) : null,
      isAdmin
        ? deleteButton({ label: `Delete point ${shortId(p.id)}`, title: "Delete this recovery point?", text: `The point of ${p.asset} made ${dateTime(p.created_at)} is removed for good. Its space is freed by the next garbage collection.`, confirmLabel: "Delete point", path: `/api/points/${enc(p.id)}`, deleted: "Recovery point deleted.", done: () => view.navigate(location.hash) })
        : null,
    );

  if (!points.length) {
    let hint;
    if (!assets.length) hint = emptyState("points", "No recovery points yet", "Add an asset to protect first; its backups appear here.", button("Go to assets", { href: "#/assets", kind: "primary" }));
    else {
      const backupBtn =
        asset && canRun
          ? button("Back up now", {
              iconName: "play",
              kind: "primary",
              onClick: async (e) => {
                const job = await busy(e.currentTarget, view.banner, () => api.post(`/api/assets/${enc(asset)}/backup`, {}));
                if (job) toast(`Backup of ${asset} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
              },
            })
          : button("Go to assets", { href: "#/assets" });
      hint = emptyState("points", "No recovery points yet — run a backup", asset ? `${asset} has not been backed up yet.` : "No asset has been backed up yet.", backupBtn);
    }
    replace(body, card(null, {}, hint));
    return;
  }
  const suspicious = points.filter((p) => p.suspicious);
  const warning = suspicious.length
    ? h(
        "div",
        { class: "banner banner-warning", role: "alert" },
        h(
          "div",
          { class: "banner-body", text: `${suspicious.length === 1 ? "One backup looks" : `${suspicious.length} backups look`} like ransomware at work (marked Suspicious below). The backups before ${suspicious.length === 1 ? "it are" : "them are"} kept until someone looks. If the files were encrypted, restore from the last backup before.` },
        ),
      )
    : null;
  replace(
    body,
    warning,
    card(
      null,
      {},
      table(
        [
          { label: "Made", cell: (p) => h("div", { class: "stack" }, p.kind === "files" ? h("a", { href: `#/points/${enc(p.id)}`, text: dateTime(p.created_at) }) : h("span", { text: dateTime(p.created_at) }), h("span", { class: "muted small", text: ago(secondsSince(p.created_at)) })) },
          { label: "Asset", cell: (p) => h("div", { class: "stack" }, h("strong", { text: p.asset }), h("span", { class: "muted small mono", text: shortId(p.id) })) },
          { label: "Mode", cell: (p) => `${MODE_NAMES[p.mode] || p.mode}${p.kind === "image" ? " · disks" : ""}`, className: "hide-md" },
          { label: "Contents", cell: (p) => h("div", { class: "stack" }, h("span", { text: bytes(p.logical_bytes) }), h("span", { class: "muted small", text: p.kind === "files" ? count(p.file_count, "file") : "disk image" })) },
          { label: "New data", cell: (p) => bytes(p.stored_bytes), className: "hide-md num" },
          { label: "Status", cell: (p) => h("div", { class: "stack" }, pointStatus(p), p.warning_count ? h("span", { class: "muted small", text: count(p.warning_count, "warning") }) : null, suspicionBlock(p, { canReview: canRun, done: () => view.navigate(location.hash) })) },
          { label: "Actions", cell: actions, className: "actions" },
        ],
        points,
        { caption: "Recovery points", rowAttrs: (p) => ({ dataset: { point: p.id } }) },
      ),
    ),
  );
}
