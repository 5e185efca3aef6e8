// The capacity chart: used space over the last 30 days against the pool's size, and where the
// growth trend takes it ("full in ~N days"). Plain SVG drawn here; it scales with its box.

import { s } from "./dom.js";
import { bytes, day } from "./format.js";

const W = 640;
const H = 230;
const M = { left: 64, right: 20, top: 18, bottom: 30 };

/** Past samples as absolute "used" values: the series is cumulative bytes added per day. */
export function usedHistory(capacity) {
  const series = capacity.series || [];
  if (!series.length) return [];
  const last = series[series.length - 1].bytes;
  return series.map((sample) => ({ day: new Date(sample.day), used: Math.max(0, capacity.used_bytes - (last - sample.bytes)) }));
}

export function horizonDays(capacity) {
  const full = capacity.days_until_full;
  if (full !== null && full !== undefined && full <= 90) return Math.max(7, Math.ceil(full * 1.15));
  return 30;
}

/** Space backups can use: what is used plus what is free (a filesystem reserves the rest). */
export function usableBytes(c) {
  return Math.max(1, (c.used_bytes || 0) + (c.free_bytes || 0));
}

export function capacityChart(capacity, now) {
  const total = usableBytes(capacity);
  const history = usedHistory(capacity);
  const past = Math.max(1, history.length - 1);
  const ahead = horizonDays(capacity);
  const x0 = M.left;
  const x1 = W - M.right;
  const y0 = H - M.bottom;
  const y1 = M.top;
  const x = (d) => x0 + ((d + past) / (past + ahead)) * (x1 - x0);
  const y = (v) => y0 - (Math.min(v, total) / total) * (y0 - y1);
  const today = new Date(now);
  const full = capacity.days_until_full;
  const slope = capacity.growth_bytes_per_day || 0;

  const summary = `Used ${bytes(capacity.used_bytes)} of ${bytes(total)}. ${
    full !== null && full !== undefined ? `At the current growth the pool is full in about ${Math.round(full)} days.` : "No growth trend that fills the pool."
  }`;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary, preserveAspectRatio: "xMidYMid meet" });
  svg.appendChild(s("title", { text: "Pool capacity" }));
  svg.appendChild(s("desc", { text: summary }));

  // grid and y labels
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    const yy = y(total * f);
    svg.appendChild(s("line", { x1: x0, x2: x1, y1: yy, y2: yy, class: f === 1 ? "chart-cap" : "chart-grid" }));
    svg.appendChild(s("text", { x: x0 - 8, y: yy + 4, "text-anchor": "end", class: "chart-label", text: f === 0 ? "0" : bytes(total * f) }));
  }
  svg.appendChild(s("text", { x: x1, y: y(total) - 6, "text-anchor": "end", class: "chart-label chart-cap-label", text: `Capacity ${bytes(total)}` }));

  // today marker and x labels
  const xt = x(0);
  svg.appendChild(s("line", { x1: xt, x2: xt, y1: y1, y2: y0, class: "chart-today" }));
  const start = history.length ? history[0].day : new Date(today.getTime() - past * 86400000);
  const end = new Date(today.getTime() + ahead * 86400000);
  svg.appendChild(s("text", { x: x0, y: H - 8, "text-anchor": "start", class: "chart-label", text: day(start) }));
  svg.appendChild(s("text", { x: xt, y: H - 8, "text-anchor": "middle", class: "chart-label chart-strong", text: "Today" }));
  svg.appendChild(s("text", { x: x1, y: H - 8, "text-anchor": "end", class: "chart-label", text: day(end) }));

  // used space: an area and its line over the past days
  if (history.length) {
    const pts = history.map((p, i) => [x(i - past), y(p.used)]);
    const line = pts.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
    svg.appendChild(s("path", { d: `${line} L${pts[pts.length - 1][0].toFixed(1)},${y0} L${pts[0][0].toFixed(1)},${y0} Z`, class: "chart-area" }));
    svg.appendChild(s("path", { d: line, class: "chart-line" }));
  }

  // the trend ahead
  const used = capacity.used_bytes;
  if (slope > 0) {
    const reach = full !== null && full !== undefined ? Math.min(ahead, full) : ahead;
    const endValue = used + slope * reach;
    svg.appendChild(s("line", { x1: xt, y1: y(used), x2: x(reach), y2: y(endValue), class: "chart-trend" }));
    if (full !== null && full !== undefined && full <= ahead) {
      const fx = x(full);
      svg.appendChild(s("circle", { cx: fx, cy: y(total), r: 5, class: "chart-full" }));
      svg.appendChild(
        s("text", { x: Math.min(fx, x1 - 4), y: y(total) + 18, "text-anchor": fx > x1 - 80 ? "end" : "middle", class: "chart-label chart-full-label", text: `Full in ~${Math.max(1, Math.round(full))} days` }),
      );
    }
  } else {
    svg.appendChild(s("line", { x1: xt, y1: y(used), x2: x1, y2: y(used), class: "chart-trend" }));
  }
  svg.appendChild(s("circle", { cx: xt, cy: y(used), r: 4, class: "chart-now" }));
  return svg;
}

// --- protection trends (GET /api/assets/{name}/trends) ------------------------------------------
// The RPO achieved is a sawtooth (the newest good point's age rises, then drops to 0 at each
// backup) drawn against its target; each boot test or failover is a dot at its RTO; each backup a
// bar of the bytes it added. The x axis is the same window in all three, so they line up.

const TW = 640;
const TH = 170;
const TM = { left: 64, right: 16, top: 14, bottom: 26 };

function trendFrame(title, summary) {
  const svg = s("svg", { class: "chart trend-chart", viewBox: `0 0 ${TW} ${TH}`, role: "img", "aria-label": summary, preserveAspectRatio: "xMidYMid meet" });
  svg.appendChild(s("title", { text: title }));
  svg.appendChild(s("desc", { text: summary }));
  return svg;
}

/** Scales of a trend chart: x over the window, y from 0 to ``top``; grid, y labels, dates. */
function trendAxes(svg, trends, top, label) {
  const end = new Date(trends.generated_at).getTime();
  const start = end - trends.days * 86400000;
  const x0 = TM.left;
  const x1 = TW - TM.right;
  const y0 = TH - TM.bottom;
  const y1 = TM.top;
  const x = (t) => x0 + ((new Date(t).getTime() - start) / Math.max(1, end - start)) * (x1 - x0);
  const y = (v) => y0 - (Math.min(Math.max(v, 0), top) / top) * (y0 - y1);
  for (const f of [0, 0.5, 1]) {
    svg.appendChild(s("line", { x1: x0, x2: x1, y1: y(top * f), y2: y(top * f), class: "chart-grid" }));
    svg.appendChild(s("text", { x: x0 - 8, y: y(top * f) + 4, "text-anchor": "end", class: "chart-label", text: f === 0 ? "0" : label(top * f) }));
  }
  svg.appendChild(s("text", { x: x0, y: TH - 6, "text-anchor": "start", class: "chart-label", text: day(new Date(start)) }));
  svg.appendChild(s("text", { x: x1, y: TH - 6, "text-anchor": "end", class: "chart-label chart-strong", text: "Today" }));
  return { x, y, x0, x1, y0 };
}

function shortPeriod(seconds) {
  if (seconds >= 86400) return `${+(seconds / 86400).toFixed(1)} d`;
  if (seconds >= 3600) return `${+(seconds / 3600).toFixed(1)} h`;
  if (seconds >= 60) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds)} s`;
}

export function rpoChart(trends) {
  const known = trends.rpo.filter((p) => p.age_seconds !== null);
  const worst = known.reduce((m, p) => Math.max(m, p.age_seconds), 0);
  const target = trends.rpo_seconds || 0;
  const over = known.some((p) => target && p.age_seconds > target);
  const summary = !known.length
    ? "No good backup in this period."
    : `Age of the newest good backup over ${trends.days} days: at most ${shortPeriod(worst)}${target ? `; target ${shortPeriod(target)}, ${over ? "missed at times" : "always met"}` : "; no target set"}.`;
  const svg = trendFrame("RPO achieved", summary);
  const top = Math.max(worst, target, 60) * 1.1;
  const { x, y } = trendAxes(svg, trends, top, shortPeriod);
  if (target) {
    svg.appendChild(s("line", { x1: TM.left, x2: TW - TM.right, y1: y(target), y2: y(target), class: "chart-target" }));
    svg.appendChild(s("text", { x: TW - TM.right, y: y(target) - 5, "text-anchor": "end", class: "chart-label chart-target-label", text: `Target ${shortPeriod(target)}` }));
  }
  // Runs of known ages: a gap (no good point yet) breaks the line.
  let d = "";
  let pen = false;
  for (const p of trends.rpo) {
    if (p.age_seconds === null) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${x(p.at).toFixed(1)},${y(p.age_seconds).toFixed(1)} `;
    pen = true;
  }
  if (d) svg.appendChild(s("path", { d: d.trim(), class: over ? "chart-line chart-line-bad" : "chart-line" }));
  return svg;
}

export function rtoChart(trends) {
  const rto = trends.rto;
  const worst = rto.reduce((m, p) => Math.max(m, p.rto_seconds), 0);
  const summary = rto.length ? `${rto.length === 1 ? "1 proven boot" : `${rto.length} proven boots`}: recovery took ${shortPeriod(Math.min(...rto.map((p) => p.rto_seconds)))} to ${shortPeriod(worst)}.` : "No proven boot in this period.";
  const svg = trendFrame("RTO measured", summary);
  const { x, y } = trendAxes(svg, trends, Math.max(worst, 10) * 1.2, shortPeriod);
  for (const p of rto) {
    const dot = s("circle", { cx: x(p.at), cy: y(p.rto_seconds), r: 5, class: p.purpose === "failover" ? "chart-dot chart-dot-failover" : "chart-dot" });
    dot.appendChild(s("title", { text: `${p.purpose === "failover" ? "Failover" : "Boot test"} ${day(new Date(p.at))}: ${shortPeriod(p.rto_seconds)}` }));
    svg.appendChild(dot);
  }
  return svg;
}

export function bytesAddedChart(trends) {
  const added = trends.bytes_added;
  const most = added.reduce((m, p) => Math.max(m, p.stored_bytes), 0);
  const total = added.reduce((n, p) => n + p.stored_bytes, 0);
  const summary = added.length ? `${added.length === 1 ? "1 backup" : `${added.length} backups`} added ${bytes(total)} in ${trends.days} days.` : "No backup in this period.";
  const svg = trendFrame("Bytes added per backup", summary);
  const { x, y, y0 } = trendAxes(svg, trends, Math.max(most, 1) * 1.1, bytes);
  for (const p of added) {
    const bar = s("rect", { x: x(p.at) - 2, y: y(p.stored_bytes), width: 4, height: Math.max(1, y0 - y(p.stored_bytes)), class: "chart-bar" });
    bar.appendChild(s("title", { text: `${day(new Date(p.at))}: ${bytes(p.stored_bytes)}` }));
    svg.appendChild(bar);
  }
  return svg;
}
