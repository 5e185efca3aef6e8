// Pools: the disks backups are stored on, their capacity and how fast they fill.

import { api, enc } from "../api.js";
import { usableBytes } from "../chart.js";
import { h, icon, replace } from "../dom.js";
import { LOCATION_NAMES, bytes, count, percent } from "../format.js";
import { button, card, deleteButton, emptyState, field, formDialog, loading, pageHeader, pill, progressBar, table, toast } from "../ui.js";

function fullText(days) {
  if (days === null || days === undefined) return "Not at the current rate";
  if (days > 3650) return "More than 10 years at this rate";
  return `~${Math.max(1, Math.round(days))} days at this rate`;
}

function poolCard(p) {
  const total = usableBytes(p);
  const fraction = p.used_bytes / total;
  const tone = fraction >= 0.9 ? "bad" : fraction >= 0.75 ? "warn" : "good";
  const full = p.days_until_full;
  return card(
    null,
    { className: "pool" },
    h(
      "div",
      { class: "pool-head" },
      h("span", { class: "pool-icon" }, icon("pools")),
      h("div", { class: "stack" }, h("h2", { text: p.name }), h("span", { class: "muted small mono break", text: p.path })),
      pill(fraction >= 0.9 ? "Almost full" : fraction >= 0.75 ? "Filling up" : "Healthy", tone),
    ),
    h("div", { class: `pool-bar pool-${tone}` }, progressBar(fraction, `Space used on ${p.name}`)),
    h("p", { class: "pool-usage" }, h("strong", { text: `${bytes(p.used_bytes)} used` }), ` of ${bytes(total)} usable (${percent(fraction)}); ${bytes(p.free_bytes)} free`),
    h(
      "dl",
      { class: "dl dl-grid" },
      h("dt", { text: "Backup store" }),
      h("dd", { text: bytes(p.store_bytes) }),
      h("dt", { text: "Recovery points" }),
      h("dd", { text: count(p.points, "point") }),
      h("dt", { text: "Growth" }),
      h("dd", { text: p.growth_bytes_per_day > 0 ? `${bytes(p.growth_bytes_per_day)} a day` : "None in 30 days" }),
      h("dt", { text: "Full in" }),
      h("dd", { class: full !== null && full < 30 ? "error-text" : null, text: fullText(full) }),
      h("dt", { text: "Disk size" }),
      h("dd", { text: bytes(p.total_bytes) }),
      h("dt", { text: "Store ID" }),
      h("dd", { class: "mono small", text: p.store_id }),
    ),
  );
}

/** Every place that holds copies of the store, whether it answers now, and how many points it
 * holds in full. Administrators add a folder (a mounted disk) or remove a location. */
function locationsCard(locations, view, reload) {
  const isAdmin = view.session.role === "admin";
  const add = () =>
    formDialog({
      title: "Add a location",
      description: "An empty folder, usually a disk mounted there, that will hold copies of recovery points.",
      submitLabel: "Add location",
      body: h(
        "div",
        field({ label: "Folder", name: "path", required: true, placeholder: "/mnt/backup-disk-2", help: "A full path. It must be empty (or already a location of this appliance), and not a system folder." }),
        field({ label: "Name", name: "label", placeholder: "backup-disk-2" }),
        h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "require_mount", checked: true }), h("span", { text: "Only when a disk is mounted there (an unmounted disk is shown as unavailable, never as empty)" })),
      ),
      onSubmit: async (form) => {
        const body = { path: form.elements.path.value.trim(), label: form.elements.label.value.trim(), require_mount: form.elements.require_mount.checked };
        await api.post("/api/locations", body);
        toast("Location added.");
        reload();
      },
    });
  const rows = table(
    [
      { label: "Location", cell: (l) => h("div", { class: "stack" }, h("strong", { text: l.label }), h("span", { class: "muted small mono truncate", title: l.address, text: l.address })) },
      { label: "Kind", cell: (l) => `${LOCATION_NAMES[l.kind] || l.kind}${l.home ? " (this appliance's pool)" : ""}${l.offsite ? ", off-site" : ""}`, className: "hide-md" },
      { label: "State", cell: (l) => (l.online ? pill("Available", "good") : pill("Unavailable", "warn", "Not mounted, missing, or holding another store's data")) },
      { label: "Points held", cell: (l) => count(l.copies, "point"), className: "num" },
      {
        label: "Actions",
        className: "actions",
        cell: (l) =>
          isAdmin && !l.home
            ? deleteButton({ label: `Remove location ${l.label}`, title: `Remove location ${l.label}?`, text: "The appliance forgets this location; the data on it is left alone. A location that still holds copies cannot be removed.", confirmLabel: "Remove location", path: `/api/locations/${enc(l.id)}`, deleted: "Location removed.", done: reload })
            : null,
      },
    ],
    locations,
    { caption: "Locations", rowAttrs: (l) => ({ dataset: { location: l.label } }) },
  );
  return card("Locations", { subtitle: "Every place that holds copies of recovery points.", actions: isAdmin ? [button("Add location", { iconName: "plus", kind: "primary", onClick: add })] : [] }, rows);
}

export default async function poolsView(view) {
  const body = h("div", loading());
  replace(view.el, pageHeader("Pools", "The disks recovery points are stored on, and every place that holds copies."), body);
  let pools;
  let locations;
  try {
    [pools, locations] = await Promise.all([api.get("/api/pools"), api.get("/api/locations")]);
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  replace(
    body,
    pools.length ? h("div", { class: "pools" }, pools.map(poolCard)) : card(null, {}, emptyState("pools", "No pools", "The appliance stores points in its data directory's pool; if it is missing, check the disk it lives on.")),
    locationsCard(locations, view, () => view.navigate(location.hash)),
  );
}
