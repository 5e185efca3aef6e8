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
