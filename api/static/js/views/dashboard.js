// Dashboard: how well each asset is really protected (its state, the reasons it is not, and a
// button that fixes each), a VM running from backup before anything else, the 3-2-1 legs at a
// glance, alerts that need a person, trends per asset and how fast the pool fills. With no point
// at all, an administrator is shown the way to recover a lost appliance from its tapes.

import { api } from "../api.js";
import { bytesAddedChart, capacityChart, rpoChart, rtoChart, usableBytes } from "../chart.js";
import { h, replace } from "../dom.js";
import { LOCATION_NAMES, ago, bytes, count, dateTime, duration, percent, period, secondsSince } from "../format.js";
import { busy, button, card, emptyState, loading, pageHeader, pill, select, table, toast } from "../ui.js";
import { legsList, statePill } from "./protection_words.js";

const REFRESH_SECONDS = 30;
const MIN_TREND_DAYS = 7;

function rpoCell(a) {
  if (a.rpo_status === "met") {
    return h("div", { class: "stack" }, pill("RPO met", "good"), h("span", { class: "muted small", text: `Target ${period(a.rpo_seconds)}; newest point ${duration(a.age_seconds)} old` }));
  }
  if (a.rpo_status === "missed") {
    const why = a.last_point_id ? `Newest point is ${duration(a.age_seconds)} old; target ${period(a.rpo_seconds)}` : `No good point yet; target ${period(a.rpo_seconds)}`;
    return h("div", { class: "stack" }, pill("RPO missed", "bad"), h("span", { class: "muted small", text: why }));
  }
  return h("div", { class: "stack" }, pill("No RPO target", "neutral"), h("span", { class: "muted small", text: "Set one in a policy" }));
}

function copiesCell(a) {
  if (!a.copies.length) return h("span", { class: "muted", text: "—" });
  return h(
    "div",
    { class: "stack" },
    h("span", { text: count(a.copies.length, "copy", "copies") }),
    a.copies.map((c) => h("span", { class: "muted small truncate", title: c.location, text: `${LOCATION_NAMES[c.location_kind] || c.location_kind}${c.state !== "present" ? ` (${c.state})` : ""}: ${c.location}` })),
  );
}

function lastPointCell(a, canRun, onBackup) {
  if (!a.last_point_id) {
    return h(
      "div",
      { class: "stack" },
      h("span", { class: "muted", text: "No recovery points yet — run a backup" }),
      canRun ? button("Back up now", { iconName: "play", kind: "small", onClick: (e) => onBackup(a, e.currentTarget) }) : null,
    );
  }
  return h(
    "div",
    { class: "stack" },
    h("a", { href: `#/points/${encodeURIComponent(a.last_point_id)}`, text: dateTime(a.last_point_at) }),
    h("span", { class: "muted small", text: `${ago(a.age_seconds)} · ${count(a.points, "point")} in all` }),
  );
}

function rto(seconds) {
  return seconds === null || seconds === undefined ? "" : `, RTO ${Number(seconds).toFixed(1)} s`;
}

// "Last proven boot: 3 hours ago, RTO 11.2 s" (or never tested / failed, with the failed check).
function bootCell(a, now) {
  const test = a.last_boot_test;
  if (!test) return h("span", { class: "muted", text: "—", title: "Only virtual machines are test-booted" });
  if (test.state === "never") {
    return h("div", { class: "stack" }, pill("Never tested", "warn"), h("span", { class: "muted small", text: "Add a boot test to its policy, or run one from Assets" }));
  }
  const proven = a.last_proven_boot;
  const provenText = proven ? `Last proven boot: ${ago(secondsSince(proven.at, now))}${rto(proven.rto_seconds)}` : "Never proven";
  if (test.state === "failed") {
    return h(
      "div",
      { class: "stack boot-cell" },
      h("a", { href: test.link, class: "boot-failed" }, pill("Boot test failed", "bad")),
      h("span", { class: "small error-text", text: test.failed_check || test.error || "" }),
      h("span", { class: "muted small", text: `${ago(secondsSince(test.at, now))} · ${provenText}` }),
    );
  }
  return h(
    "div",
    { class: "stack boot-cell" },
    pill("Boot proven", "good"),
    h("a", { href: test.link, class: "small", text: provenText }),
  );
}

// Who may press a fix: starting work takes an operator, changing policies or copies an admin.
const FIX_ROLES = { run_backup: "operator", run_verify: "operator", run_boot_test: "operator", add_policy: "admin", add_copy_rule: "admin" };

function fixButton(view, asset, fix, onFix) {
  const role = FIX_ROLES[fix.action];
  if (role && !view.can(role)) return null;
  const label = `${fix.label}: ${asset}`;
  if (fix.link) return button(fix.label, { kind: "small", href: fix.link, "aria-label": label, dataset: { fix: fix.action } });
  return button(fix.label, { kind: "small", "aria-label": label, dataset: { fix: fix.action }, onClick: (e) => onFix(asset, fix, e.currentTarget) });
}

// One button per fix: three missing legs that one copy rule mends offer it once.
function reasonsList(view, asset, reasons, onFix) {
  const offered = new Set();
  const once = (fix) => {
    const key = `${fix.action} ${fix.link || ""}`;
    if (offered.has(key)) return null;
    offered.add(key);
    return fixButton(view, asset, fix, onFix);
  };
  return h(
    "ul",
    { class: "reasons" },
    reasons.map((r) => h("li", { class: `reason reason-${r.severity}`, dataset: { code: r.code } }, h("span", { class: "reason-text", text: r.message }), r.fix ? once(r.fix) : null)),
  );
}

// Everything that is not protected, worst first; a VM running from backup leads, in its own colour.
function attentionPanel(view, attention, onFix) {
  if (!attention.length) return null;
  const running = attention.filter((a) => a.state === "running_from_backup");
  const rest = attention.filter((a) => a.state !== "running_from_backup");
  const item = (a) =>
    h(
      "li",
      { class: `attention-asset attention-${a.state}`, dataset: { asset: a.asset, state: a.state } },
      h("div", { class: "attention-head" }, h("strong", { text: a.asset }), statePill(a.state)),
      reasonsList(view, a.asset, a.reasons, onFix),
    );
  return [
    running.length
      ? h(
          "section",
          { class: "running-from-backup", role: "region", "aria-label": "Running from backup" },
          h("h2", { class: "alerts-title", text: running.length === 1 ? `${running[0].asset} is running from its backup` : `${count(running.length, "virtual machine")} are running from backup` }),
          h("ul", { class: "attention-list" }, running.map(item)),
        )
      : null,
    rest.length
      ? h(
          "section",
          { class: "attention", role: "region", "aria-label": "Needs attention" },
          h("h2", { class: "alerts-title", text: `${count(rest.length, "asset")} ${rest.length === 1 ? "is" : "are"} not fully protected` }),
          h("ul", { class: "attention-list" }, rest.map(item)),
        )
      : null,
  ];
}

function protectionCell(a) {
  return h("div", { class: "stack" }, statePill(a.state), legsList(a.legs), a.reasons.length ? h("span", { class: "muted small", text: count(a.reasons.length, "reason") }) : null);
}

function trendsCard(assets) {
  if (!assets.length) return null;
  const charts = h("div", { class: "trend-charts" }, loading());
  const picker = select(
    "trend_asset",
    assets.map((a) => [a.asset, a.asset]),
    assets[0].asset,
    { "aria-label": "Asset" },
  );
  async function show() {
    const name = picker.value;
    const vm = assets.some((a) => a.asset === name && a.kind === "vm");
    let t;
    try {
      t = await api.get(`/api/assets/${encodeURIComponent(name)}/trends?days=30`);
    } catch (err) {
      replace(charts, h("p", { class: "error-text", text: String(err.message || err) }));
      return;
    }
    const box = (title, chart, note) => h("figure", { class: "trend" }, h("figcaption", { text: title }), h("div", { class: "chart-box" }, chart), note ? h("p", { class: "muted small", text: note }) : null);
    replace(
      charts,
      box("RPO achieved: age of the newest good backup", rpoChart(t), t.rpo_seconds ? `The dashed line is the target, ${period(t.rpo_seconds)}.` : "No RPO target is set for this asset."),
      vm ? box("RTO: time to a proven boot", rtoChart(t), "One dot per boot test or failover.") : null,
      box("Bytes added per backup", bytesAddedChart(t), null),
    );
  }
  picker.addEventListener("change", show);
  show();
  return card("Trends, last 30 days", { subtitle: "Look for the line crossing its target, and for bars much taller than the rest", actions: [picker], className: "trends-card" }, charts);
}

function alertsPanel(alerts, now) {
  if (!alerts.length) return null;
  const critical = alerts.filter((al) => al.severity === "critical").length;
  return h(
    "section",
    { class: ["alerts", critical ? "alerts-critical" : "alerts-warning"], role: "region", "aria-label": "Alerts" },
    h("h2", { class: "alerts-title", text: `${count(alerts.length, "alert")} need${alerts.length === 1 ? "s" : ""} attention` }),
    h(
      "ul",
      { class: "alerts-list" },
      alerts.map((al) =>
        h(
          "li",
          { class: `alert alert-${al.severity}`, dataset: { kind: al.kind, asset: al.asset } },
          pill(al.severity === "critical" ? "Critical" : "Warning", al.severity === "critical" ? "bad" : "warn"),
          h("a", { href: al.link, class: "alert-message", text: al.message }),
          al.at ? h("span", { class: "muted small", text: ago(secondsSince(al.at, now)) }) : null,
        ),
      ),
    ),
  );
}

function stat(label, value, note, tone = "", href = null) {
  const body = [h("span", { class: "stat-label", text: label }), h("span", { class: "stat-value", text: value }), note ? h("span", { class: "stat-note", text: note }) : null];
  return href ? h("a", { class: ["stat", tone && `stat-${tone}`], href }, body) : h("div", { class: ["stat", tone && `stat-${tone}`] }, body);
}

function capacityCard(c, now) {
  const total = usableBytes(c);
  const other = Math.max(0, c.used_bytes - c.store_bytes);
  const bar = h(
    "div",
    { class: "stacked", role: "img", "aria-label": `Backup store ${bytes(c.store_bytes)}, other data ${bytes(other)}, free ${bytes(c.free_bytes)}` },
    h("span", { class: "seg seg-store", style: { width: `${Math.max(c.store_bytes ? 0.6 : 0, (100 * c.store_bytes) / total)}%` } }),
    h("span", { class: "seg seg-other", style: { width: `${(100 * other) / total}%` } }),
  );
  let trend;
  const full = c.days_until_full;
  const perDay = bytes(c.growth_bytes_per_day);
  if (c.history_days !== undefined && c.history_days < MIN_TREND_DAYS) {
    // One day of backups is not a rate (appliance.protection.MIN_TREND_DAYS).
    trend = c.history_days ? `Too early for a forecast: ${count(c.history_days, "day")} of backups so far; a trend needs ${MIN_TREND_DAYS}` : "No backups yet: nothing to forecast from";
  } else if (full !== null && full !== undefined && full <= 3650) {
    trend = `Growing about ${perDay} a day: full in ~${Math.max(1, Math.round(full))} days`;
  } else if (c.growth_bytes_per_day > 0) {
    trend = `Growing about ${perDay} a day: more than 10 years of space left at this rate`;
  } else {
    trend = "No growth in the last 30 days";
  }
  return card(
    "Capacity",
    { subtitle: "The default pool's disk, last 30 days and the trend ahead", className: "capacity-card" },
    h(
      "div",
      { class: "capacity" },
      h("div", { class: "chart-box" }, capacityChart(c, now)),
      h(
        "div",
        { class: "capacity-side" },
        h("p", { class: "capacity-big" }, h("strong", { text: percent(c.used_bytes / total) }), h("span", { class: "muted", text: " used" })),
        bar,
        h(
          "ul",
          { class: "legend" },
          h("li", h("span", { class: "swatch swatch-store" }), `Backup store ${bytes(c.store_bytes)}`),
          h("li", h("span", { class: "swatch swatch-other" }), `Other data ${bytes(other)}`),
          h("li", h("span", { class: "swatch swatch-free" }), `Free ${bytes(c.free_bytes)} of ${bytes(total)} usable`),
        ),
        h("p", { class: full !== null && full !== undefined && full < 30 ? "trend trend-bad" : "trend", text: trend }),
      ),
    ),
  );
}

export default async function dashboard(view) {
  const body = h("div", loading());
  const refresh = button("Refresh", { iconName: "refresh", kind: "ghost", onClick: () => load() });
  const report = button("Weekly report", { kind: "ghost", href: "#/report" });
  replace(view.el, pageHeader("Dashboard", "How well each asset is protected, and how fast the pool fills.", report, refresh), body);
  const enc = encodeURIComponent;

  async function backupNow(asset, btn) {
    const job = await busy(btn, view.banner, () => api.post(`/api/assets/${enc(asset.asset)}/backup`, {}));
    if (job) toast(`Backup of ${asset.asset} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  }

  async function runFix(asset, fix, btn) {
    if (fix.action === "run_backup") return backupNow({ asset }, btn);
    if (fix.action === "run_verify") {
      const job = await busy(btn, view.banner, () => api.post(`/api/points/${enc(fix.point)}/verify`, {}));
      if (job) toast(`Verify of ${asset}'s newest backup started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
      return undefined;
    }
    if (fix.action === "run_boot_test") {
      const job = await busy(btn, view.banner, () => api.post(`/api/assets/${enc(asset)}/boot-test`, {}));
      if (!job) return undefined;
      toast(`Boot test of ${asset} started.`, { link: { href: `#/jobs/${job.id}`, text: "Open the job" } });
      view.navigate(`#/failover?job=${enc(job.id)}`);
    }
    return undefined;
  }

  async function load() {
    let d;
    try {
      d = await api.get("/api/dashboard");
    } catch (err) {
      view.banner.error(err);
      replace(body);
      return;
    }
    const now = new Date(d.generated_at);
    const withTarget = d.assets.filter((a) => a.rpo_status !== "none");
    const met = withTarget.filter((a) => a.rpo_status === "met").length;
    const pointsTotal = d.assets.reduce((n, a) => n + a.points, 0);
    const failedJobs = d.jobs.failed + d.jobs.interrupted;
    const sum = d.summary;
    const notFine = sum.assets - sum.protected;
    const alertCount = (d.alerts || []).length;
    const stats = h(
      "div",
      { class: "stats" },
      stat(
        "Needs attention",
        notFine ? count(notFine, "asset") : failedJobs ? count(failedJobs, "job") : alertCount ? count(alertCount, "alert") : sum.assets ? "Nothing" : "Nothing yet",
        [
          notFine ? "Reasons and fixes above" : sum.assets ? "Every rule passes for every asset" : "Add an asset to protect",
          alertCount ? count(alertCount, "alert") : null,
          failedJobs ? `${d.jobs.failed} failed, ${d.jobs.interrupted} interrupted` : "no failed jobs",
        ]
          .filter(Boolean)
          .join(" · "),
        notFine || failedJobs || alertCount ? "bad" : sum.assets ? "good" : "",
        notFine ? null : "#/jobs?state=failed",
      ),
      stat(
        "RPO targets",
        withTarget.length ? `${met} of ${withTarget.length} met` : "None set",
        withTarget.length ? (met < withTarget.length ? `${withTarget.length - met} missed` : sum.all_protected ? "All assets within target" : "Targets met; other rules are not") : "Give a policy an RPO",
        withTarget.length && met < withTarget.length ? "bad" : withTarget.length && sum.all_protected ? "good" : "",
      ),
      stat("Assets", String(d.assets.length), `${count(pointsTotal, "recovery point")}`, "", "#/assets"),
      stat("Jobs", d.jobs.running ? `${d.jobs.running} running` : "Idle", d.jobs.queued ? `${d.jobs.queued} queued` : "Nothing queued", d.jobs.running ? "info" : "", "#/jobs"),
    );
    const canRun = view.can("operator");
    const assetsCard = card(
      "Protection by asset",
      { subtitle: `As of ${dateTime(d.generated_at)}` },
      d.assets.length
        ? table(
            [
              { label: "Asset", className: "col-asset", cell: (a) => h("div", { class: "stack" }, h("strong", { text: a.asset }), h("span", { class: "muted small", text: `${a.kind === "vm" ? "Virtual machine" : "Folder"}${a.policies.length ? ` · ${a.policies.join(", ")}` : " · no policy"}` })) },
              { label: "Protection", cell: protectionCell },
              { label: "Last good point", cell: (a) => lastPointCell(a, canRun, backupNow) },
              { label: "RPO", cell: rpoCell },
              { label: "Boot test", cell: (a) => bootCell(a, now.getTime()) },
              { label: "Copies", cell: copiesCell, className: "col-copies" },
              { label: "Size", cell: (a) => h("div", { class: "stack" }, h("span", { text: a.last_point_id ? bytes(a.logical_bytes) : "—" }), h("span", { class: "muted small", text: `${bytes(a.stored_bytes)} stored` })), className: "num hide-md" },
            ],
            d.assets,
            { caption: "Protection status of each asset", rowAttrs: (a) => ({ dataset: { asset: a.asset, state: a.state } }) },
          )
        : emptyState("assets", "Nothing is protected yet", "Add a folder or a virtual machine, give it a policy, and its backups show up here.", view.can("admin") ? button("Add an asset", { iconName: "plus", kind: "primary", href: "#/assets" }) : null),
    );
    // A fresh appliance may be standing in for a lost one (Tape screen, tape_recover.js).
    const fromTapes =
      !pointsTotal && view.can("admin")
        ? h("p", { class: "muted small dash-recover" }, "Replacing an appliance that was lost? ", h("a", { href: "#/tape", text: "Recover it from its tapes" }), ".")
        : null;
    const trends = body.querySelector(".trends-card") && body.dataset.assets === d.assets.map((a) => a.asset).join("\n") ? body.querySelector(".trends-card") : trendsCard(d.assets);
    body.dataset.assets = d.assets.map((a) => a.asset).join("\n");
    replace(body, attentionPanel(view, d.attention || [], runFix), alertsPanel(d.alerts || [], now.getTime()), stats, assetsCard, fromTapes, trends, capacityCard(d.capacity, now));
  }

  await load();
  const timer = setInterval(load, REFRESH_SECONDS * 1000);
  view.onDispose(() => clearInterval(timer));
}
