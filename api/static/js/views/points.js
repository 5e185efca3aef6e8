// Recovery points: the list per asset, and restore / verify / delete of a point.

import { api, enc, q } from "../api.js";
import { h, replace } from "../dom.js";
import { MODE_NAMES, ago, bytes, count, dateTime, secondsSince, shortId } from "../format.js";
import { button, busy, card, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast, deleteButton } from "../ui.js";

export function pointStatus(p) {
  if (p.status !== "complete") return pill(p.status === "partial" ? "Incomplete" : p.status, "warn");
  if (p.verify_status === "damaged") return pill("Damaged", "bad", p.verified_at ? `Verified ${dateTime(p.verified_at)}` : null);
  if (p.verify_status === "ok") return pill("Verified", "good", `Verified ${dateTime(p.verified_at)}`);
  return pill("Complete", "neutral", "Not verified yet");
}

export function pointTitle(p) {
  return `${p.asset} · ${dateTime(p.created_at)}`;
}

/** Restore a point (or one path of it, or one disk) to a folder on the appliance. */
export async function restoreDialog(point, { path = "", onStarted = null } = {}) {
  let disks = [];
  if (point.kind === "image") {
    try {
      const detail = await api.get(`/api/points/${enc(point.id)}`);
      disks = detail.manifest.disks || [];
    } catch {
      disks = [];
    }
  }
  const isFiles = point.kind === "files";
  const target = field({
    label: "Restore to",
    name: "target",
    required: true,
    placeholder: isFiles ? "/srv/restore" : "/var/lib/vms/restored",
    help: isFiles ? "A folder on the appliance. It is created if needed; files of the same name inside are replaced." : "A folder (or, for one disk, an image file) on the appliance.",
  });
  const what = isFiles
    ? field({ label: "Only this file or folder (optional)", name: "path", value: path, placeholder: "everything", help: "A path inside the point, e.g. docs/report.pdf. Empty: the whole point." })
    : h(
        "div",
        { class: "grid-2" },
        field({ label: "Disk", control: select("disk", [["", "All disks"], ...disks.map((d) => [d.name, `${d.name} (${bytes(d.size)})`])], "") }),
        field({ label: "Image format", control: select("format", [["raw", "Raw"], ["qcow2", "QCOW2"], ["vmdk", "VMDK"], ["vhdx", "VHDX"], ["vdi", "VDI"]], "raw") }),
      );
  formDialog({
    title: "Restore",
    description: `From the point of ${point.asset} made ${dateTime(point.created_at)} (${ago(secondsSince(point.created_at))}). The restore runs as a job.`,
    submitLabel: "Start restore",
    body: h("div", what, target),
    onSubmit: async (form) => {
      const body = { target: form.elements.target.value.trim() };
      if (isFiles) {
        const p = form.elements.path.value.trim();
        if (p) body.path = p;
      } else {
        if (form.elements.disk.value) body.disk = form.elements.disk.value;
        body.format = form.elements.format.value;
      }
      const job = await api.post(`/api/points/${enc(point.id)}/restore`, body);
      toast(`Restore to ${body.target} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
      if (onStarted) onStarted(job);
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
  replace(
    body,
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
          { label: "Status", cell: (p) => h("div", { class: "stack" }, pointStatus(p), p.warning_count ? h("span", { class: "muted small", text: count(p.warning_count, "warning") }) : null) },
          { label: "Actions", cell: actions, className: "actions" },
        ],
        points,
        { caption: "Recovery points", rowAttrs: (p) => ({ dataset: { point: p.id } }) },
      ),
    ),
  );
}
