// Pools: the disks backups are stored on, their capacity and how fast they fill.

import { api } from "../api.js";
import { usableBytes } from "../chart.js";
import { h, icon, replace } from "../dom.js";
import { bytes, count, percent } from "../format.js";
import { card, emptyState, loading, pageHeader, pill, progressBar } from "../ui.js";

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

export default async function poolsView(view) {
  const body = h("div", loading());
  replace(view.el, pageHeader("Pools", "The disks recovery points are stored on."), body);
  let pools;
  try {
    pools = await api.get("/api/pools");
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  replace(body, pools.length ? h("div", { class: "pools" }, pools.map(poolCard)) : card(null, {}, emptyState("pools", "No pools", "The appliance stores points in its data directory's pool; if it is missing, check the disk it lives on.")));
}
