// Tape media pools on the Tape screen: each pool's allocation, retention and schedule, and the
// dialog that creates or changes one. The schedule is picked in words (the same controls as the
// policy and verify schedules, schedule_words.js); which points a scheduled backup writes is the
// newest point of each asset, or the points a GFS rule keeps (the rule retention uses). An
// operator deletes a pool once it is empty; the API's refusal (a tape or a set with copies left
// in it) comes back as a toast in its own words.

import { api, enc } from "../api.js";
import { h, icon } from "../dom.js";
import { count, dateTime, describeCron } from "../format.js";
import { button, card, confirmDialog, emptyState, field, formDialog, select, setApplies, table, toast } from "../ui.js";
import { scheduleControls } from "./schedule_words.js";

const ALLOCATIONS = [
  ["continue", "Append to the open set"],
  ["new_set", "A new set every time"],
];
const GFS = [
  ["keep_daily", "Daily"],
  ["keep_weekly", "Weekly"],
  ["keep_monthly", "Monthly"],
  ["keep_yearly", "Yearly"],
];

function poolDialog(pool, drives, ctx) {
  const isNew = !pool;
  const p = pool || { allocation: "continue", retention_days: 28, schedule: null, drive: null, points: { rule: "newest" } };
  const when = scheduleControls(p.schedule || "0 3 * * 6", { label: "When the pool is written" });
  const on = select("schedule_on", [["on", "On a schedule"], ["off", "Only when asked"]], p.schedule ? "on" : "off", { "aria-label": "Back up to this pool by itself" });
  const drive = select("drive", drives, p.drive || (drives.length ? drives[0][0] : ""), { "aria-label": "Drive of the scheduled backups" });
  const whenBox = h("div", { class: "tape-pool-when" }, when.el, field({ label: "Drive", control: drive }));
  const rule = select("rule", [["newest", "The newest point of each asset"], ["gfs", "The points a GFS rule keeps"]], p.points.rule || "newest", { "aria-label": "Which points" });
  const gfsBox = h(
    "div",
    { class: "grid-2 tape-pool-gfs" },
    GFS.map(([key, label]) => field({ label, name: key, type: "number", min: 0, max: 1000, value: p.points[key] ?? (key === "keep_weekly" ? 4 : 0) })),
  );
  const assets = field({ label: "Only these assets (optional)", name: "assets", value: (p.points.assets || []).join(", "), help: "Asset names separated by commas; empty: every asset." });
  const apply = () => {
    setApplies(whenBox, on.value === "on");
    setApplies(gfsBox, rule.value === "gfs");
  };
  on.addEventListener("change", apply);
  rule.addEventListener("change", apply);
  apply();
  formDialog({
    title: isNew ? "New media pool" : `Media pool ${p.name}`,
    description: "A pool writes media sets: tapes written together and kept for the retention. On a schedule, the appliance starts a tape backup by itself; points already on the pool's open set are not written again.",
    submitLabel: isNew ? "Create pool" : "Save pool",
    wide: true,
    body: h(
      "div",
      isNew ? field({ label: "Name", name: "name", required: true, maxlength: 64, placeholder: "weekly" }) : null,
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Allocation", control: select("allocation", ALLOCATIONS, p.allocation) }),
        field({ label: "Retention (days)", name: "retention_days", type: "number", min: 0, value: p.retention_days, help: "A tape may be written over when every point on it is older than this or kept elsewhere." }),
      ),
      field({ label: "Back up by itself", control: on }),
      whenBox,
      field({ label: "Which points", control: rule }),
      gfsBox,
      assets,
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const name = isNew ? el.name.value.trim() : p.name;
      const points = { rule: rule.value, assets: el.assets.value.split(/[\s,]+/).filter(Boolean) };
      if (rule.value === "gfs") for (const [key] of GFS) points[key] = Number(el[key].value) || 0;
      const scheduled = on.value === "on";
      const body = {
        allocation: el.allocation.value,
        retention_days: Number(el.retention_days.value) || 0,
        schedule: scheduled ? when.cron() : null,
        drive: scheduled ? drive.value || null : null,
        points,
      };
      const saved = await api.put(`/api/tape/pools/${enc(name)}`, body);
      toast(`Media pool ${saved.name} saved${saved.schedule ? `: ${describeCron(saved.schedule).toLowerCase()}` : ""}.`);
      ctx.refresh();
    },
  });
}

/** Ask, then DELETE the pool; a 409 (tapes or sets with copies left) is a toast in the API's words. */
function deletePool(pool, ctx) {
  confirmDialog({
    title: `Delete media pool ${pool.name}?`,
    text: "The pool and its schedule are forgotten. This is possible only once no tape belongs to it and none of its sets holds a copy: erase its tapes first.",
    confirmLabel: "Delete pool",
    action: async () => {
      try {
        await api.del(`/api/tape/pools/${enc(pool.name)}`);
      } catch (err) {
        if (err.status !== 409) throw err;
        toast(err.message, { kind: "error", timeout: 10000 });
        return;
      }
      toast(`Media pool ${pool.name} deleted.`);
      ctx.refresh();
    },
  });
}

function poolActions(pool, drives, ctx) {
  return h(
    "div",
    { class: "row-actions" },
    button("Edit…", { kind: "small", "aria-label": `Edit pool ${pool.name}`, onClick: () => poolDialog(pool, drives, ctx) }),
    h("button", { type: "button", class: "icon-btn danger", title: "Delete", "aria-label": `Delete pool ${pool.name}`, onClick: () => deletePool(pool, ctx) }, icon("trash")),
  );
}

/** The "Media pools" card: one row per pool, with its schedule in words and when it runs next. */
export function poolsCard(pools, drives, ctx) {
  const canEdit = ctx.view.can("operator");
  const actions = canEdit ? [button("New media pool…", { iconName: "plus", onClick: () => poolDialog(null, drives, ctx) })] : [];
  const rows = table(
    [
      { label: "Pool", cell: (p) => h("div", { class: "stack" }, h("strong", { text: p.name }), h("span", { class: "muted small", text: `${ALLOCATIONS.find(([v]) => v === p.allocation)?.[1] || p.allocation}; kept ${count(p.retention_days, "day")}` })) },
      {
        label: "Schedule",
        cell: (p) =>
          p.schedule
            ? h("div", { class: "stack" }, h("span", { text: describeCron(p.schedule) }), h("span", { class: "muted small", text: `Next: ${p.next_run ? dateTime(p.next_run) : "—"} · ${p.drive}` }))
            : h("span", { class: "muted", text: "Only when asked" }),
      },
      { label: "Points", cell: (p) => h("span", { text: p.points_words }) },
      { label: "Tapes", cell: (p) => `${count(p.tapes, "tape")} in ${count(p.sets, "set")}`, className: "hide-md" },
      { label: "Actions", className: "actions", cell: (p) => (canEdit ? poolActions(p, drives, ctx) : null) },
    ],
    pools,
    { caption: "Media pools", rowAttrs: (p) => ({ dataset: { pool: p.name, scheduled: p.schedule ? "yes" : "no" } }) },
  );
  return card(
    "Media pools",
    { subtitle: "Where tape backups go, and when they run by themselves.", actions },
    pools.length ? rows : emptyState("disk", "No media pool yet", "Create one to back up to tape, by hand or on a schedule."),
  );
}
