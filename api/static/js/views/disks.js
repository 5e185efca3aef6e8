// Storage › Disks: every block device the appliance sees, and whether it may join a pool (the
// refusals in the appliance's own words). Also the pieces the Storage screens share: their tabs,
// the list of jobs started from them (with live progress), and the dialog that makes a pool.
//
// Disks are named by their identity (serial, WWN, loop:<file>), never by /dev/sdX: the node is
// shown for people, but the requests carry identities, which the appliance resolves itself.

import { ApiError, api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { bytes, capitalise, count, dateTime, progressSummary, shortId } from "../format.js";
import { busy, button, card, emptyState, field, formDialog, loading, pageHeader, pill, progressBar, select, table, toast } from "../ui.js";

// --- the Storage area's frame -------------------------------------------------------------------

const TABS = [
  ["pools", "#/pools", "Pools"],
  ["disks", "#/disks", "Disks"],
  ["media", "#/media", "USB disks"],
];

/** The Storage area's heading and its tabs (Pools, Disks, USB disks). */
export function storageHeader(active, subtitle, ...actions) {
  return h(
    "div",
    pageHeader("Storage", subtitle, ...actions),
    h(
      "nav",
      { class: "tabs", "aria-label": "Storage" },
      TABS.map(([key, href, label]) => h("a", { href, class: key === active ? "tab active" : "tab", "aria-current": key === active ? "page" : null, text: label })),
    ),
  );
}

// --- jobs started here, with their progress --------------------------------------------------------

const DONE = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const STATE_WORDS = { queued: "Queued", running: "Running", waiting: "Waiting", succeeded: "Done", failed: "Failed", cancelled: "Cancelled", interrupted: "Interrupted" };
const STATE_TONES = { queued: "neutral", running: "info", waiting: "warn", succeeded: "good", failed: "bad", cancelled: "neutral", interrupted: "warn" };
const POLL_MS = 1000;
const KEPT_KEY = "storage-jobs";

function fraction(job) {
  const p = job.progress || {};
  if (job.state === "succeeded") return 1;
  if (typeof p.percent === "number") return p.percent / 100;
  if (p.bytes_total) return (p.bytes_done || 0) / p.bytes_total;
  return null;
}

function sentence(text) {
  const t = capitalise(String(text || "").trim());
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

/** What a job is doing, or what came of it, in words. */
export function jobWords(job) {
  const p = job.progress || {};
  if (job.state === "failed") return sentence((job.error && job.error.message) || "The job failed");
  if (job.state === "waiting") return sentence(job.wait_reason || "Waiting for something outside the appliance");
  if (job.state === "queued") return p.waiting ? sentence(p.waiting) : "Waiting to start.";
  if (job.state === "interrupted") return "Stopped when the service shut down; retry it under Jobs.";
  const r = job.result || {};
  if (job.state === "succeeded") {
    if (job.kind === "pool_create") return `Pool ${r.pool} is ready.`;
    if (job.kind === "pool_import") return `Pool ${r.pool || r.name || ""} is imported.`;
    if (job.kind === "pool_scrub") return r.scrub && r.scrub.uncorrectable ? `${r.scrub.uncorrectable} error(s) could not be repaired: verify the points on the pool.` : "Every block was checked; no error is left.";
    if (job.kind === "pool_replace") return `The new disk holds the copies of ${r.replaced || "the old one"} now.`;
    if (job.kind === "usb_initialise") return `USB disk ${r.label} is ready and safe to remove.`;
    if (job.kind === "usb_export") return r.safe_to_remove ? `USB disk ${r.label} is safe to remove.` : `Written to USB disk ${r.label}; eject it before pulling it.`;
    if (job.kind === "usb_eject") return `USB disk ${r.label} is safe to remove.`;
    return "Done.";
  }
  const parts = [p.phase ? capitalise(p.phase) : null, progressSummary(p, job.state)].filter(Boolean);
  return parts.length ? parts.join(" · ") : "Starting…";
}

/** A job's state pill, progress bar and words (a row of the "Started here" list, or a table). */
export function jobProgress(job) {
  const f = fraction(job);
  return h(
    "div",
    { class: "jp" },
    job.state === "running" || job.state === "succeeded" ? h("div", { class: "jp-bar" }, progressBar(f, `Progress of ${job.description}`), h("span", { class: "jp-pct", text: f === null ? "" : `${Math.floor(f * 100)}%` })) : null,
    h("span", { class: job.state === "failed" ? "error-text" : "muted small", text: jobWords(job) }),
  );
}

/**
 * The jobs started from the Storage screens, polled until they end ("Started here"). Kept for
 * the browser tab's session, so a job started on one tab is still followed on the next.
 * onEnd(job) runs when one of them ends (the screen reloads what it changed).
 */
export function startedJobs(view, { onEnd = () => {} } = {}) {
  const list = h("ul", { class: "fo-jobs plain" });
  const box = card("Started here", { subtitle: "Jobs started from these screens, with their progress. Every job is also under Jobs.", className: "storage-jobs" }, list);
  box.hidden = true;
  const rows = new Map();
  let timer = null;
  let stopped = false;
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });

  const draw = (job) => {
    let row = rows.get(job.id);
    if (!row) {
      row = h("li", { class: "fo-job", dataset: { job: job.id } });
      rows.set(job.id, row);
      list.insertBefore(row, list.firstChild);
      box.hidden = false;
    }
    row.dataset.state = job.state;
    row.dataset.kind = job.kind;
    replace(
      row,
      h("div", { class: "fo-job-head" }, h("strong", { text: capitalise(job.description || job.kind) }), pill(STATE_WORDS[job.state] || job.state, STATE_TONES[job.state] || "neutral"), h("a", { href: `#/jobs/${enc(job.id)}`, class: "small", text: `Job ${shortId(job.id)}` }), h("span", { class: "muted small", text: dateTime(job.created_at) })),
      jobProgress(job),
    );
  };

  const remember = (id) => {
    try {
      const kept = JSON.parse(sessionStorage.getItem(KEPT_KEY) || "[]").filter((x) => x !== id);
      sessionStorage.setItem(KEPT_KEY, JSON.stringify([...kept, id].slice(-6)));
    } catch {
      // private mode: followed while this screen is open only
    }
  };

  const active = new Map();
  const poll = async () => {
    timer = null;
    for (const id of [...active.keys()]) {
      let job;
      try {
        job = await api.get(`/api/jobs/${enc(id)}`);
      } catch {
        continue; // the next round tries again
      }
      if (stopped) return;
      draw(job);
      if (DONE.has(job.state)) {
        active.delete(id);
        onEnd(job);
      }
    }
    if (active.size && !stopped) timer = setTimeout(poll, POLL_MS);
  };

  const track = (job, { fresh = true } = {}) => {
    draw(job);
    if (fresh) remember(job.id);
    if (!DONE.has(job.state)) {
      active.set(job.id, job);
      if (!timer) timer = setTimeout(poll, POLL_MS);
    }
  };

  // What was started earlier in this tab's session.
  (async () => {
    let kept = [];
    try {
      kept = JSON.parse(sessionStorage.getItem(KEPT_KEY) || "[]");
    } catch {
      kept = [];
    }
    const found = await Promise.all(kept.map((id) => api.get(`/api/jobs/${enc(id)}`).catch(() => null)));
    if (!stopped) for (const job of found) if (job) track(job, { fresh: false });
  })();

  return {
    el: box,
    track,
    /** POST an action that answers with a job: say so, and follow its progress here. */
    async submit(path, body, label) {
      const job = await api.post(path, body);
      toast(`${label} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
      track(job);
      return job;
    },
  };
}

// --- making a pool ---------------------------------------------------------------------------------

const LAYOUTS = [
  ["ext4:single", "ext4 on one disk", 1, 1],
  ["xfs:single", "xfs on one disk", 1, 1],
  ["btrfs:single", "btrfs on one disk (checksums, no second copy)", 1, 1],
  ["btrfs:raid1", "btrfs raid1: a mirror (two copies of every block)", 2, 99],
  ["btrfs:raid10", "btrfs raid10: mirrored and striped (4 disks or more)", 4, 99],
];

function diskLabel(d) {
  const what = [d.vendor, d.model].filter(Boolean).join(" ") || (d.kind === "loop" ? "loop device" : "disk");
  return `${d.devnode} · ${bytes(d.size_bytes)} · ${what}`;
}

/** What the chosen layout means for the data, in words. */
export function redundancyWords(layout, disks) {
  const n = disks.length;
  const total = disks.reduce((sum, d) => sum + (d.size_bytes || 0), 0);
  if (!n) return "Choose the disks the pool is made of.";
  if (layout.endsWith(":single")) {
    const checks = layout.startsWith("btrfs") ? " btrfs checksums every block, so damage is found (a scrub says so), but there is no second copy to repair it from." : "";
    return `One disk, one copy: if the disk fails, the copies on it are lost (keep copies elsewhere too).${checks} Usable: about ${bytes(total)}.`;
  }
  const half = bytes(total / 2);
  if (layout === "btrfs:raid10") return `Every block is on two of the ${n} disks, striped for speed: the pool keeps working when one disk fails (and is rebuilt onto a new one with Replace disk). Usable: about ${half}.`;
  return `Every block is on two of the ${n} disks: the pool keeps working when one disk fails, serving from the other copy, and a scrub repairs a bad copy from the good one. Usable: about ${half}.`;
}

/** Make a pool from eligible disks (administrators). disks: GET /api/disks's list. */
export function createPoolDialog(disks, jobs) {
  const eligible = disks.filter((d) => d.eligible);
  const layout = select("layout", LAYOUTS.map(([v, label]) => [v, label]), "ext4:single");
  const words = h("span", { id: "pool-layout-words" });
  const erase = h("ul", { class: "plain small warn-text" });
  const boxes = eligible.map((d) => h("input", { type: "checkbox", name: "disks", value: d.identity, "aria-label": `Disk ${diskLabel(d)}` }));
  const chosen = () => eligible.filter((_, i) => boxes[i].checked);
  let picked = false; // the user chose a layout: keep it while it fits
  const refresh = () => {
    const n = chosen().length;
    for (const option of layout.options) {
      const [, , min, max] = LAYOUTS.find(([v]) => v === option.value);
      option.disabled = n > 0 && (n < min || n > max);
    }
    if (layout.selectedOptions[0] && layout.selectedOptions[0].disabled) picked = false;
    if (!picked) layout.value = n >= 2 ? "btrfs:raid1" : "ext4:single";
    words.textContent = redundancyWords(layout.value, chosen());
    replace(erase, chosen().flatMap((d) => (d.warnings || []).map((w) => h("li", { text: `${d.devnode} ${w}` }))));
  };
  layout.addEventListener("change", () => {
    picked = true;
    refresh();
  });
  boxes.forEach((b) => b.addEventListener("change", refresh));
  const list = eligible.length
    ? h("div", { class: "disk-choices" }, eligible.map((d, i) => h("label", { class: "fo-check" }, boxes[i], h("span", h("strong", { text: d.devnode }), ` ${bytes(d.size_bytes)} · ${[d.vendor, d.model].filter(Boolean).join(" ") || d.kind}`, h("span", { class: "muted small mono", text: ` ${d.identity}` })))))
    : h("p", { class: "muted", text: "No disk may join a pool now: the Disks tab says why for each." });
  refresh();
  formDialog({
    title: "Create a pool",
    description: "A pool is a filesystem on disks of its own that holds a copy of the store, so the points survive the loss of the system disk. The disks you choose are erased.",
    submitLabel: "Create pool",
    danger: true,
    wide: true,
    body: h(
      "div",
      field({ label: "Pool name", name: "name", required: true, placeholder: "mirror", help: "Lower-case letters, digits and dashes; not “default”." }),
      h("fieldset", { class: "field" }, h("legend", { class: "label", text: "Disks" }), list, erase),
      field({ label: "Layout", control: layout, help: words }),
      h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "erase" }), h("span", { text: "I understand that everything on the chosen disks is erased" })),
    ),
    onSubmit: async (form) => {
      const picks = chosen();
      if (!picks.length) throw new ApiError(400, "invalid_input", "choose at least one disk", { field: "disks" });
      if (!form.elements.erase.checked) throw new ApiError(400, "invalid_input", "tick the box to confirm that the chosen disks may be erased", { field: "erase" });
      const [fsType, profile] = layout.value.split(":");
      const name = form.elements.name.value.trim();
      await jobs.submit("/api/pools", { name, disks: picks.map((d) => d.identity), fs_type: fsType, profile }, `Creating pool ${name}`);
    },
  });
}

// --- the Disks tab -----------------------------------------------------------------------------------

function eligibilityCell(d) {
  return h(
    "div",
    { class: "stack" },
    d.eligible ? pill("May join a pool", "good") : pill("Not for a pool", "neutral"),
    d.refusals.length ? h("ul", { class: "plain small refusals" }, d.refusals.map((r) => h("li", { text: capitalise(r) }))) : null,
    d.warnings.length ? h("ul", { class: "plain small warn-text" }, d.warnings.map((w) => h("li", { text: capitalise(w) }))) : null,
  );
}

function usedCell(d) {
  if (d.pool) return h("span", { text: `Pool ${d.pool}` });
  if (d.medium) return h("span", { text: `USB disk ${d.medium}` });
  if (d.fs_type) return h("span", { class: "muted", text: `${d.fs_type}${d.fs_label ? ` “${d.fs_label}”` : ""}` });
  return h("span", { class: "muted", text: "Empty" });
}

function smartCell(d) {
  if (!d.smart) return h("span", { class: "muted", text: d.kind === "partition" ? "—" : "Not read" });
  const tone = { ok: "good", failing: "bad" }[d.smart.status] || "neutral";
  const words = { ok: "Healthy", failing: "Failing", unknown: "Unknown" }[d.smart.status] || d.smart.status;
  return h("div", { class: "stack" }, pill(words, tone), h("span", { class: "muted small", text: sentence(d.smart.reason) }), d.smart.warnings.map((w) => h("span", { class: "small warn-text", text: sentence(w) })));
}

function disksTable(answer) {
  return table(
    [
      {
        label: "Disk",
        cell: (d) =>
          h(
            "div",
            { class: "stack" },
            h("strong", { text: d.devnode }),
            h("span", { class: "small", text: [d.vendor, d.model].filter(Boolean).join(" ") || capitalise(d.kind) }),
            h("span", { class: "muted small mono truncate", title: d.identity, text: d.identity }),
          ),
      },
      { label: "Size", cell: (d) => bytes(d.size_bytes), className: "num" },
      { label: "Bus", cell: (d) => [d.bus ? d.bus.toUpperCase() : d.kind === "loop" ? "Loop" : "—", d.removable ? "removable" : null].filter(Boolean).join(", "), className: "hide-md" },
      { label: "Holds", cell: usedCell },
      { label: "Pool eligibility", cell: eligibilityCell },
      { label: "SMART", cell: smartCell, className: "hide-md" },
    ],
    answer.disks,
    { caption: "Disks", rowAttrs: (d) => ({ dataset: { disk: d.identity, devnode: d.devnode } }) },
  );
}

function scanWords(answer) {
  const how = answer.udev_events ? "udev events and a rescan" : "a rescan";
  const every = answer.rescan_seconds ? ` every ${count(Math.round(answer.rescan_seconds), "second")}` : " when this screen asks";
  return `Scanned ${dateTime(answer.scanned_at)}; disks are found by ${how}${every}.`;
}

export default async function disksView(view) {
  const body = h("div", loading());
  const jobs = startedJobs(view, { onEnd: () => load() });
  const rescan = view.can("operator") ? button("Rescan", { iconName: "refresh", onClick: (e) => load(e.currentTarget, "rescan") }) : null;
  const smart = button("Read SMART", { iconName: "shield", title: "Ask every disk for its SMART health (takes a few seconds)", onClick: (e) => load(e.currentTarget, "smart") });
  const create = view.can("admin") ? button("Create pool", { iconName: "plus", kind: "primary", onClick: () => createPoolDialog(current ? current.disks : [], jobs) }) : null;
  replace(view.el, storageHeader("disks", "Every disk the appliance sees, and whether it may join a pool.", ...[rescan, smart, create].filter(Boolean)), jobs.el, body);
  let current = null;

  async function load(btn = null, how = "list") {
    const ask = () => (how === "rescan" ? api.post("/api/disks/rescan", {}) : api.get(how === "smart" ? "/api/disks?smart=1" : "/api/disks"));
    const answer = btn ? await busy(btn, view.banner, ask) : await ask().catch((err) => view.banner.error(err) && null);
    if (!answer || !answer.disks) return;
    current = answer;
    if (how === "rescan") toast(`Found ${count(answer.disks.length, "disk")}.`);
    replace(
      body,
      card(
        "Disks",
        { subtitle: scanWords(answer) },
        answer.disks.length ? disksTable(answer) : emptyState("disk", "No disks found", "The appliance sees no block device; check that the disks are connected, then rescan."),
      ),
    );
  }
  await load();
}
