// Jobs: the list with live progress (server-sent events), and one job with its log.

import { api, enc, q, subscribe } from "../api.js";
import { h, replace } from "../dom.js";
import { MODE_NAMES, STATE_NAMES, bytes, capitalise, count, dateTime, duration, listText, progressSummary, rate, shortId, time } from "../format.js";
import { button, busy, card, emptyState, loading, pageHeader, progressBar, statePill, toast } from "../ui.js";

const ACTIVE = new Set(["queued", "running", "waiting"]);
const RETRYABLE = new Set(["failed", "cancelled", "interrupted"]);
const FILTERS = [
  ["", "All"],
  ["running", "Running"],
  ["queued", "Queued"],
  ["waiting", "Waiting"],
  ["succeeded", "Succeeded"],
  ["failed", "Failed"],
  ["interrupted", "Interrupted"],
  ["cancelled", "Cancelled"],
];

function fractionOf(job) {
  const p = job.progress || {};
  if (job.state === "succeeded") return 1;
  if (typeof p.percent === "number") return p.percent / 100;
  if (p.bytes_total) return (p.bytes_done || 0) / p.bytes_total;
  return null;
}

function percentText(job) {
  const f = fractionOf(job);
  if (f === null) return null;
  if (job.state === "succeeded") return "100%";
  return `${Math.min(99, Math.floor(f * 100))}%`;
}

function waitingText(progress) {
  const why = progress && progress.waiting;
  if (!why) return "Waiting to start";
  if (why === "resuming") return "Waiting to resume after the restart";
  return /^waiting/i.test(why) ? capitalise(why) : `Waiting: ${why}`;
}

/** The API's description with long ids shortened: "restore of 1a2113d6be11684d" -> "Restore of point 1a2113d6". */
export function jobTitle(job) {
  let text = String(job.description || job.kind);
  if (job.kind === "restore" || job.kind === "verify") text = text.replace(/ of ([0-9a-f]{12,})\b/, " of point $1");
  return capitalise(text.replace(/\b([0-9a-f]{8})[0-9a-f]{4,}\b/g, "$1"));
}

function errorText(job) {
  const e = job.error || {};
  const message = e.message ? capitalise(e.message) : "The job failed.";
  return /[.!?]$/.test(message) ? message : `${message}.`;
}

function elapsed(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return (end - new Date(job.started_at)) / 1000;
}

/** The progress of a job in a few words and a bar. */
function progressBlock(job) {
  const p = job.progress || {};
  const summary = progressSummary(p, job.state);
  switch (job.state) {
    case "queued":
      return h("div", { class: "jp" }, h("span", { class: "waiting", text: waitingText(p) }));
    case "running": {
      const pct = percentText(job);
      return h(
        "div",
        { class: "jp" },
        h("div", { class: "jp-bar" }, progressBar(fractionOf(job), `Progress of ${job.description}`), h("span", { class: "jp-pct", text: pct || "" })),
        h("span", { class: "muted small", text: summary || "Starting…" }),
      );
    }
    case "succeeded":
      return h(
        "div",
        { class: "jp" },
        h("div", { class: "jp-bar" }, progressBar(1, `Progress of ${job.description}`), h("span", { class: "jp-pct", text: "100%" })),
        h("span", { class: "muted small", text: [summary, job.started_at ? `took ${duration(elapsed(job))}` : null].filter(Boolean).join(" · ") }),
      );
    case "failed":
      return h("div", { class: "jp" }, h("span", { class: "error-text", text: errorText(job) }));
    case "interrupted":
      return h("div", { class: "jp" }, h("span", { class: "warn-text", text: "Stopped when the service shut down. Retry to resume it." }), summary ? h("span", { class: "muted small", text: summary }) : null);
    case "waiting":
      return h("div", { class: "jp" }, h("span", { class: "waiting", text: `Waiting: ${job.wait_reason || "for something outside the appliance"}${job.wake_at ? ` (tries again ${dateTime(job.wake_at)})` : ""}` }), summary ? h("span", { class: "muted small", text: summary }) : null);
    case "cancelled":
      return h("div", { class: "jp" }, h("span", { class: "muted", text: summary ? `Cancelled after ${summary}` : "Cancelled" }));
    default:
      return h("div", { class: "jp" }, summary);
  }
}

function jobActions(job, view, onChange, { details = true } = {}) {
  const canRun = view.can("operator");
  return h(
    "div",
    { class: "row-actions" },
    canRun && ACTIVE.has(job.state)
      ? button("Cancel", {
          kind: "small",
          "aria-label": `Cancel ${job.description}`,
          onClick: async (e) => {
            const updated = await busy(e.currentTarget, view.banner, () => api.post(`/api/jobs/${enc(job.id)}/cancel`, {}));
            if (updated) {
              toast(job.state === "running" ? "Cancelling: the job stops at its next check." : "Job cancelled.");
              onChange(updated);
            }
          },
        })
      : null,
    canRun && RETRYABLE.has(job.state)
      ? button(job.state === "interrupted" ? "Resume" : "Retry", {
          kind: "small",
          iconName: "refresh",
          "aria-label": `Retry ${job.description}`,
          onClick: async (e) => {
            const again = await busy(e.currentTarget, view.banner, () => api.post(`/api/jobs/${enc(job.id)}/retry`, {}));
            if (again) {
              toast(again.id === job.id ? "Job queued again." : "Job started again as a new job.", { link: { href: `#/jobs/${again.id}`, text: "Open" } });
              onChange(again);
            }
          },
        })
      : null,
    details ? button("Details", { kind: "small", href: `#/jobs/${enc(job.id)}`, "aria-label": `Details of ${job.description}` }) : null,
  );
}

// --- the list ------------------------------------------------------------------------------------

export async function jobList(view) {
  const filter = view.query.get("state") || "";
  const tabs = h(
    "div",
    { class: "tabs", role: "tablist", "aria-label": "Filter jobs by state" },
    FILTERS.map(([value, label]) => h("a", { href: value ? `#/jobs?state=${value}` : "#/jobs", role: "tab", class: value === filter ? "tab active" : "tab", "aria-selected": value === filter ? "true" : "false", text: label })),
  );
  const live = h("span", { class: "live", title: "Updates arrive as they happen" }, h("span", { class: "live-dot" }), "Live");
  const tbody = h("tbody");
  const tableEl = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "table jobs-table" },
      h("caption", { class: "sr-only", text: "Jobs" }),
      h("thead", h("tr", ["Job", "State", "Progress", "When", "Actions"].map((label, i) => h("th", { scope: "col", class: i === 3 ? "hide-md" : i === 4 ? "actions" : null, text: label })))),
      tbody,
    ),
  );
  const emptyBox = h("div");
  replace(view.el, pageHeader("Jobs", "Backups, restores, verifications and maintenance, as they run.", live), tabs, card(null, {}, tableEl, emptyBox));

  const rows = new Map();
  const jobs = new Map();
  const matches = (job) => !filter || job.state === filter;

  function rowFor(job) {
    const row = h(
      "tr",
      { dataset: { job: job.id } },
      h("td", { "data-label": "Job" }, h("div", { class: "stack" }, h("a", { href: `#/jobs/${enc(job.id)}`, class: "strong", text: jobTitle(job) }), h("span", { class: "muted small mono", text: shortId(job.id) }))),
      h("td", { "data-label": "State" }),
      h("td", { "data-label": "Progress", class: "progress-cell" }),
      h("td", { "data-label": "When", class: "hide-md" }),
      h("td", { "data-label": "Actions", class: "actions" }),
    );
    fill(row, job);
    return row;
  }

  /** Update a row in place: the bar glides, and a button under the pointer stays put. */
  function fill(row, job) {
    const [, stateCell, progressCell, whenCell, actionsCell] = row.children;
    const changed = row.dataset.state !== job.state;
    row.dataset.state = job.state;
    const when = job.finished_at ? `Finished ${dateTime(job.finished_at)}` : job.started_at ? `Started ${dateTime(job.started_at)}` : `Queued ${dateTime(job.created_at)}`;
    if (changed) {
      replace(stateCell, statePill(job.state, STATE_NAMES[job.state] || job.state));
      replace(actionsCell, jobActions(job, view, upsert));
    }
    replace(whenCell, h("span", { class: "small", text: when }));
    const bar = progressCell.querySelector(".progress");
    const fraction = fractionOf(job);
    if (!changed && job.state === "running" && bar && (fraction === null) === bar.classList.contains("progress-indeterminate")) {
      if (fraction !== null) {
        bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
        bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
      }
      progressCell.querySelector(".jp-pct").textContent = percentText(job) || "";
      progressCell.querySelector(".jp > .muted").textContent = progressSummary(job.progress, job.state) || "Starting…";
    } else {
      replace(progressCell, progressBlock(job));
    }
  }

  function showEmpty() {
    replace(
      emptyBox,
      jobs.size
        ? null
        : emptyState("jobs", filter ? `No ${(FILTERS.find(([v]) => v === filter) || ["", ""])[1].toLowerCase()} jobs` : "No jobs yet", "Backups, restores and verifications show up here while they run and after.", button("Go to assets", { href: "#/assets" })),
    );
    tableEl.hidden = jobs.size === 0;
  }

  function upsert(job) {
    if (!matches(job)) {
      if (rows.has(job.id)) {
        rows.get(job.id).remove();
        rows.delete(job.id);
        jobs.delete(job.id);
      }
      showEmpty();
      return;
    }
    jobs.set(job.id, job);
    const old = rows.get(job.id);
    if (old) fill(old, job);
    else {
      const fresh = rowFor(job);
      tbody.insertBefore(fresh, tbody.firstChild);
      rows.set(job.id, fresh);
    }
    showEmpty();
  }

  async function load() {
    const list = await api.get(q("/api/jobs", { state: filter, limit: 200 }));
    // newest first from the API: insert oldest first so the newest ends on top
    for (const job of list.reverse()) upsert(job);
  }

  try {
    await load();
  } catch (err) {
    view.banner.error(err);
  }
  showEmpty();
  let reloadTimer = null;
  const close = subscribe("/api/events", {
    open: () => {
      live.classList.remove("off");
      // catch what changed between the first load and the stream's start
      clearTimeout(reloadTimer);
      reloadTimer = setTimeout(() => load().catch(() => {}), 700);
    },
    error: () => live.classList.add("off"),
    job: (job) => upsert(job),
  });
  view.onDispose(() => {
    clearTimeout(reloadTimer);
    close();
  });
}

// --- one job -----------------------------------------------------------------------------------------

const PARAM_LABELS = {
  asset: "Asset",
  policy: "Policy",
  mode: "Mode",
  source: "Source",
  disks: "Disks",
  point: "Recovery point",
  target: "Restore to",
  path: "Only",
  disk: "Disk",
  format: "Format",
  trigger: "Started by",
  max_bytes: "Budget",
  grace: "Grace period",
  rules: "Rules",
  session: "Failover session",
  network: "Network",
  new_point: "New recovery point",
  write_to: "Write the disks to",
  discard: "Delete its changes",
  target_dir: "Local folder",
};

function valueText(key, value) {
  if (value === null || value === undefined || value === "") return "—";
  if (Array.isArray(value)) return value.map((v) => valueText("", v)).join(", ");
  if (typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k.replace(/_/g, " ")} ${valueText(k, v)}`)
      .join(", ");
  }
  if (typeof value === "number" && /bytes|max_bytes/.test(key)) return bytes(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return String(value);
}

function definitionList(obj, labels = {}) {
  const entries = Object.entries(obj || {}).filter(([, v]) => v !== null && v !== undefined && v !== "");
  return h("dl", { class: "dl" }, entries.map(([k, v]) => [h("dt", { text: labels[k] || capitalise(k.replace(/_/g, " ")) }), h("dd", { text: valueText(k, v) })]));
}

const RESULT_LABELS = {
  files: "Files",
  dirs: "Folders",
  directories: "Folders",
  bytes_total: "Data read",
  logical_bytes: "Data in the point",
  new_bytes: "New data stored",
  bytes_read: "Bytes read",
  files_reused: "Unchanged files reused",
  files_read: "Files read",
  warnings: "Warnings",
  mode: "Mode",
  prune_job: "Prune job",
  removed: "Points removed",
  kept: "Points kept",
};
const RESULT_ORDER = ["mode", "files", "dirs", "bytes_total", "new_bytes", "files_reused", "warnings", "removed", "kept", "prune_job"];

const FAILOVER_KINDS = new Set(["failover_start", "boot_test", "failover_stop", "failover_migrate", "failover_failback"]);

/** A failover job's result: the session it ran, the RTO, the point it booted or made. */
function failoverResult(job) {
  const r = job.result || {};
  const parts = [];
  if (r.session) parts.push(h("p", h("a", { href: `#/failover/${enc(r.session)}`, class: "strong", text: "Open the failover session" }), h("span", { class: "muted", text: ` (${shortId(r.session)})` })));
  if (r.rto_seconds !== undefined && r.rto_seconds !== null) parts.push(h("p", { text: `Booted and proven ${Number(r.rto_seconds).toFixed(1)} s after the click.` }));
  if (r.point && job.kind === "failover_failback") parts.push(h("p", "Made recovery point ", h("a", { href: `#/points/${enc(r.point)}`, class: "mono", text: shortId(r.point) }), "."));
  else if (r.point) parts.push(h("p", "Booted recovery point ", h("a", { href: `#/points/${enc(r.point)}`, class: "mono", text: shortId(r.point) }), "."));
  for (const target of r.written || []) parts.push(h("p", { text: `Wrote the disk to ${target}.` }));
  if (r.local_disks) parts.push(h("p", { text: `Runs on local disk: ${Object.values(r.local_disks).join(", ")}.` }));
  return parts.length ? parts : h("p", { class: "muted", text: "Done." });
}

const CONFLICT_WORDS = {
  overwrite: "Files already there were replaced by the restored ones.",
  keep_both: "Files already there were kept beside the restored ones.",
  skip: "Files already there were left as they were.",
};

/** A restore's result in one sentence: what it restored, from when, and where to. */
export function restoreSentence(r) {
  const from = `${r.asset ? ` of ${r.asset}` : ""}${r.point_created_at ? ` from the point of ${dateTime(r.point_created_at)}` : ` from point ${shortId(r.point)}`}`;
  const only = r.path ? ` (only ${r.path})` : "";
  if (Array.isArray(r.disks)) {
    return `Restored ${count(r.disks.length, "disk")}${from}${only} to ${listText(r.disks)}.`;
  }
  const what = `${count(r.files, "file")}${r.bytes !== undefined ? ` (${bytes(r.bytes)})` : ""}`;
  return `Restored ${what}${from}${only} to ${r.target}.`;
}

function restoreResult(job) {
  const r = job.result || {};
  const parts = [h("p", { class: "restore-sentence", text: restoreSentence(r) })];
  const kept = typeof r.kept === "number" ? r.kept : (r.kept || []).length;
  const conflict = CONFLICT_WORDS[r.on_conflict];
  if (conflict) parts.push(h("p", { class: "muted", text: kept ? `${conflict.slice(0, -1)} (${count(kept, "file")} kept aside).` : conflict }));
  if (r.point) parts.push(h("p", h("a", { href: `#/points/${enc(r.point)}`, text: "Open the recovery point" })));
  return parts;
}

function resultBlock(job) {
  if (FAILOVER_KINDS.has(job.kind)) return failoverResult(job);
  if (job.kind === "restore") return restoreResult(job);
  const r = job.result || {};
  const parts = [];
  if (r.point) {
    parts.push(h("p", "Made recovery point ", h("a", { href: `#/points/${enc(r.point)}`, class: "mono", text: shortId(r.point) }), ". ", h("a", { href: `#/points/${enc(r.point)}`, text: "Browse its files" }), "."));
  }
  const flat = { ...(r.stats || {}) };
  for (const [k, v] of Object.entries(r)) if (!["point", "stats"].includes(k)) flat[k] = v;
  // the usual figures first, in words; the rest only when the page knows a name for them
  if (flat.directories !== undefined && flat.dirs === undefined) flat.dirs = flat.directories;
  const keys = RESULT_ORDER.filter((k) => k in flat);
  const pairs = keys
    .filter((k) => flat[k] !== null && flat[k] !== undefined && typeof flat[k] !== "object")
    .map((k) => {
      const v = flat[k];
      let text;
      if (k === "mode") text = MODE_NAMES[v] || String(v);
      else if (k === "prune_job") text = shortId(v);
      else if (typeof v === "number") text = /bytes/.test(k) ? bytes(v) : v.toLocaleString("en-US");
      else text = String(v);
      return [RESULT_LABELS[k] || capitalise(k.replace(/_/g, " ")), text];
    });
  if (pairs.length) parts.push(h("dl", { class: "dl dl-grid" }, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])));
  return parts.length ? parts : h("p", { class: "muted", text: "Done." });
}

export async function jobDetail(view) {
  const [jobId] = view.params;
  replace(view.el, loading());
  let job;
  let lines;
  try {
    [job, lines] = await Promise.all([api.get(`/api/jobs/${enc(jobId)}`), api.get(`/api/jobs/${enc(jobId)}/log`)]);
  } catch (err) {
    replace(view.el, pageHeader("Job"), h("p", h("a", { href: "#/jobs", text: "Back to jobs" })));
    view.banner.error(err);
    return;
  }
  let lastSeq = lines.length ? lines[lines.length - 1].seq : 0;
  const head = h("div");
  const progressBox = h("div");
  const outcomeBox = h("div");
  const logList = h("ol", { class: "log", "aria-live": "polite" });
  const logEmpty = h("p", { class: "muted", text: "No log lines yet." });

  const addLine = (line) => {
    logEmpty.remove();
    logList.appendChild(
      h("li", { class: `log-line log-${line.level}` }, h("time", { datetime: line.at, text: time(line.at) }), h("span", { class: "log-level", text: line.level }), h("span", { class: "log-msg", text: line.message })),
    );
  };

  const onChange = (updated) => {
    if (updated.id !== job.id) view.navigate(`#/jobs/${updated.id}`);
    else {
      draw(updated);
      follow();
    }
  };

  // the parts of the progress card that change; the card itself (and its open/closed
  // "What this job does") stays, and a button under the pointer is never swapped mid-click
  const barBox = h("div", { class: "slot" });
  const statusBox = h("div", { class: "slot" });
  const statsBox = h("div", { class: "slot" });
  const progressCard = card(
    "Progress",
    {},
    h("div", { class: "card-body" }, barBox, statusBox, statsBox, h("details", { class: "params" }, h("summary", { text: "What this job does" }), definitionList(job.params, PARAM_LABELS))),
  );
  progressBox.appendChild(progressCard);
  let shownState = null;

  function drawBar() {
    const running = job.state === "running";
    const fraction = fractionOf(job);
    const text = percentText(job) || (running ? "Working…" : "");
    const bar = barBox.querySelector(".progress");
    if ((running || job.state === "succeeded") && bar && (fraction === null) === bar.classList.contains("progress-indeterminate")) {
      if (fraction !== null) {
        bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
        bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
      }
      barBox.querySelector(".big-pct").textContent = text;
      return;
    }
    replace(barBox, running || job.state === "succeeded" ? h("div", { class: "big-progress" }, progressBar(fraction, `Progress of ${job.description}`), h("span", { class: "big-pct", text })) : null);
  }

  function draw(next) {
    job = next;
    if (job.state !== shownState) {
      shownState = job.state;
      view.setTitle(jobTitle(job));
      replace(
        head,
        pageHeader(jobTitle(job), `Job ${shortId(job.id)} · ${job.kind.replace(/_/g, " ")} · queued ${dateTime(job.created_at)}`, statePill(job.state, STATE_NAMES[job.state] || job.state), jobActions(job, view, onChange, { details: false })),
      );
    }
    const p = job.progress || {};
    const stats = [
      ["Files", p.files !== undefined ? Number(p.files).toLocaleString("en-US") : null],
      ["Data", p.bytes_done !== undefined ? (p.bytes_total ? `${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}` : bytes(p.bytes_done)) : null],
      ["Rate", job.state === "running" && p.rate ? rate(p.rate) : null],
      ["Time left", job.state === "running" && p.eta !== undefined && p.bytes_total ? `about ${duration(p.eta)}` : null],
      ["Elapsed", job.started_at ? duration(elapsed(job)) : null],
      ["Started", job.started_at ? dateTime(job.started_at) : null],
      ["Finished", job.finished_at ? dateTime(job.finished_at) : null],
    ].filter(([, v]) => v !== null);
    let status = null;
    if (job.state === "queued") status = h("p", { class: "waiting", text: waitingText(p) });
    else if (job.state === "waiting") status = h("p", { class: "waiting", text: `Waiting: ${job.wait_reason || "for something outside the appliance"}. It holds no resources meanwhile and continues by itself${job.wake_at ? ` (next try ${dateTime(job.wake_at)})` : " when what it waits for happens"}.` });
    else if (job.state === "interrupted") status = h("p", { class: "warn-text", text: "The service stopped while this job ran. Resume it to continue where it stopped." });
    else if (job.state === "cancelled") status = h("p", { class: "muted", text: "Cancelled." });
    else if (job.state === "running" && (job.kind === "failover_start" || job.kind === "boot_test")) {
      status = h("p", h("a", { href: `#/failover?job=${enc(job.id)}`, text: "Follow the boot on the failover screen" }), " (its console and serial log).");
    }
    drawBar();
    replace(statusBox, status);
    replace(statsBox, stats.length ? h("dl", { class: "dl dl-grid" }, stats.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])) : null);
    if (job.state === "succeeded") replace(outcomeBox, card("Result", {}, resultBlock(job)));
    else if (job.state === "failed") {
      replace(outcomeBox, card("What went wrong", { className: "card-bad" }, h("p", { class: "error-text", text: errorText(job) }), job.error && job.error.code ? h("p", { class: "muted small", text: `Error code: ${job.error.code}` }) : null));
    } else replace(outcomeBox);
  }

  let stream = null;
  function follow() {
    if (stream || !ACTIVE.has(job.state)) return;
    stream = subscribe(`/api/jobs/${enc(job.id)}/events?after_seq=${lastSeq}`, {
      job: (data) => draw(data),
      log: (line) => {
        if (line.seq > lastSeq) {
          lastSeq = line.seq;
          addLine(line);
        }
      },
      end: () => {
        // the job stopped: close before EventSource reconnects by itself
        if (stream) stream();
        stream = null;
      },
    });
  }
  view.onDispose(() => stream && stream());

  draw(job);
  replace(view.el, head, progressBox, outcomeBox, card("Log", { subtitle: "What the job reported, oldest first" }, lines.length ? null : logEmpty, logList));
  for (const line of lines) addLine(line);
  follow();
}
