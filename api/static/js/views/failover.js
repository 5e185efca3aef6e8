// Failover: VMs booted straight from a recovery point. The list of sessions, the screen that
// follows a failover job until its session exists, and one session: its state in words, the
// measured RTO (click to boot proof), the console picture and serial console, and the actions
// that end it (stop), free it from the backup (move to local disk) or keep its changes (fail back).
//
// Polling, not server-sent events: a session changes little and slowly (a few states a minute),
// and the console picture and serial log are files, not events. Every timer is cleared when the
// screen is left (view.onDispose).

import { ApiError, api, enc, humanError, q, scoped } from "../api.js";
import { h, replace } from "../dom.js";
import { capitalise, dateTime, duration, secondsSince, shortId, time } from "../format.js";
import { button, card, emptyState, field, formDialog, loading, pageHeader, pill, select, table } from "../ui.js";
import { liveConsole } from "./console.js";
import { networkRows } from "./network_picker.js";
import { ACTIVE, JOB_DONE, SESSION_POLL_MS, PICTURE_MS, JOB_POLL_MS, PENDING_POLL_MS, PURPOSE_NAMES, failedReason, stateWords, shortLabel, rtoText, accelText, storageText, healthUrl, proofText, checksText, readText, pointLink } from "./failover_words.js";

export async function failoverList(view) {
  const jobId = view.query.get("job");
  const pendingBox = h("div");
  const body = h("div", loading());
  replace(view.el, pageHeader("Failover", "Virtual machines booted straight from a recovery point on this appliance, and boot tests."), pendingBox, body);
  let timer = null;
  let stopped = false;
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });

  const statePill = (info) => pill(shortLabel(info), stateWords(info).tone, info.state === "failed" ? failedReason((info.details || {}).error || info.error) : null);

  async function load() {
    const sessions = await api.get("/api/failover");
    replace(
      body,
      card(
        "Sessions",
        { subtitle: "Newest first. Open one to see its console, its RTO and what you can do with it." },
        sessions.length
          ? table(
              [
                { label: "Asset", cell: (s) => h("a", { href: `#/failover/${enc(s.id)}`, class: "strong", text: s.asset, "aria-label": `Open the ${(PURPOSE_NAMES[s.purpose] || s.purpose).toLowerCase()} of ${s.asset} started ${dateTime(s.started_at)}` }) },
                { label: "Point", cell: (s) => pointLink(s.point_id), className: "hide-md" },
                { label: "Purpose", cell: (s) => PURPOSE_NAMES[s.purpose] || s.purpose },
                { label: "State", cell: statePill },
                { label: "RTO", cell: (s) => (s.rto_seconds !== null && s.rto_seconds !== undefined ? h("strong", { text: rtoText(s.rto_seconds) }) : h("span", { class: "muted", text: "—" })), className: "num" },
                { label: "Started", cell: (s) => h("span", { class: "small", text: dateTime(s.started_at) }), className: "hide-md" },
                { label: "Live", cell: (s) => (s.live ? pill("Live", "good", "Running in this appliance now") : h("span", { class: "muted", text: "No" })) },
              ],
              sessions,
              { caption: "Failover sessions", rowAttrs: (s) => ({ dataset: { session: s.id, state: s.state } }) },
            )
          : emptyState(
              "play",
              "No failovers yet",
              "To run a virtual machine from its backup, press “Fail over” (or “Boot test”, to prove a point boots) next to it under Assets & policies.",
              button("Go to assets", { href: "#/assets" }),
            ),
      ),
    );
    return sessions;
  }

  async function followJob() {
    let job;
    try {
      job = await api.get(`/api/jobs/${enc(jobId)}`);
    } catch (err) {
      view.banner.error(err);
      return false;
    }
    const asset = (job.params || {}).asset;
    const what = job.kind === "boot_test" ? "boot test" : "failover";
    const jobLink = h("a", { href: `#/jobs/${enc(job.id)}`, text: "Open the job" });
    if (asset) {
      // one failover of an asset at a time: the newest session requested by this job's click
      const sessions = await api.get(q("/api/failover", { asset })).catch(() => []);
      const created = Date.parse(job.created_at);
      const mine = sessions.find((s) => {
        const requested = Date.parse((s.details || {}).requested_at || "");
        return Number.isFinite(requested) ? Math.abs(requested - created) < 1000 : Date.parse(s.started_at) >= created - 2000;
      });
      if (mine) {
        location.replace(`#/failover/${enc(mine.id)}`);
        return false;
      }
    }
    if (JOB_DONE.has(job.state)) {
      const message = job.error && job.error.message ? capitalise(job.error.message) : `The job ${job.state}.`;
      replace(pendingBox, card(`The ${what} of ${asset || "the VM"} did not start`, { className: "card-bad" }, h("p", { class: "error-text", role: "alert", text: message }), h("p", jobLink)));
      return false;
    }
    const phase = (job.progress || {}).phase;
    const status = job.state === "queued" ? "Waiting for its turn…" : phase === "exporting" ? "Exporting the disks from the store…" : phase === "booting" ? "Booting…" : "Checking the recovery point…";
    replace(
      pendingBox,
      card(
        `Starting the ${what} of ${asset || "the VM"}`,
        { className: "fo-pending" },
        h("div", { class: "loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), h("span", { text: `${status} The session opens here as soon as it exists.` })),
        h("p", jobLink),
      ),
    );
    return true;
  }

  async function tick() {
    if (stopped) return;
    let again = false;
    try {
      if (jobId) again = await followJob();
      const sessions = await load();
      again = again || sessions.some((s) => ACTIVE.has(s.state));
    } catch (err) {
      view.banner.error(err);
    }
    if (!stopped && again) timer = setTimeout(tick, jobId ? PENDING_POLL_MS : SESSION_POLL_MS);
  }
  await tick();
}

// --- one session -------------------------------------------------------------------------------------

async function getText(path) {
  const response = await fetch(scoped(path), { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/plain" } });
  if (!response.ok) throw new ApiError(response.status, `http_${response.status}`, response.statusText);
  return response.text();
}

function jobOutcome(job, info) {
  const r = job.result || {};
  if (job.state === "failed" || job.state === "cancelled" || job.state === "interrupted") {
    const message = job.error && job.error.message ? capitalise(job.error.message) : `The job ${job.state}.`;
    return h("p", { class: "error-text", text: `Did not work: ${message}` });
  }
  if (job.state !== "succeeded") return h("p", { class: "muted", text: job.state === "queued" ? "Waiting for its turn…" : "Working…" });
  switch (job.kind) {
    case "failover_stop":
      return h("p", { text: r.state === "stopped" ? "The VM is stopped. Its changes are kept for a failback unless you chose to delete them." : `The session is ${r.state}.` });
    case "failover_migrate":
      return h("p", { text: `The VM now runs on local disk: ${Object.values(r.local_disks || {}).join(", ")}. It no longer needs the backup.` });
    case "failover_failback": {
      const parts = [];
      if (r.point) {
        parts.push(
          h(
            "p",
            { class: "fo-made" },
            "Made recovery point ",
            pointLink(r.point),
            ` of ${info.asset}`,
            r.read_only_changes ? " (only what the VM wrote was read)" : "",
            ". ",
            h("a", { href: `#/points?asset=${enc(info.asset)}`, text: "See its points" }),
            ".",
          ),
        );
      }
      for (const target of r.written || []) parts.push(h("p", { text: `Wrote the disk to ${target}.` }));
      return parts.length ? parts : h("p", { text: "Done." });
    }
    default:
      return h("p", { text: "Done." });
  }
}

function storageKey(sessionId) {
  return `appliance.failover-jobs.${sessionId}`;
}

export async function failoverSession(view) {
  const [sessionId] = view.params;
  const base = `/api/failover/${enc(sessionId)}`;
  replace(view.el, loading());
  let info;
  try {
    info = await api.get(base);
  } catch (err) {
    replace(view.el, pageHeader("Failover session"), h("p", h("a", { href: "#/failover", text: "Back to the failover sessions" })));
    view.banner.error(err);
    return;
  }

  const timers = new Set();
  let disposed = false;
  const later = (fn, ms) => {
    const t = setTimeout(() => {
      timers.delete(t);
      if (!disposed) fn();
    }, ms);
    timers.add(t);
  };
  view.onDispose(() => {
    disposed = true;
    for (const t of timers) clearTimeout(t);
    timers.clear();
  });

  const headBox = h("div");
  const heroBox = h("div");
  const detailsBox = h("div", { class: "slot" });
  const actionsBox = h("div", { class: "slot" });
  const jobList = h("ul", { class: "plain fo-jobs", "aria-live": "polite" });
  const jobsCard = card("What you started here", { subtitle: "Actions on this session, and how they ended" }, h("div", { class: "card-body" }, jobList));
  jobsCard.hidden = true;

  // the console picture: a cache-busting query so the browser fetches a fresh one each time
  const picture = h("img", { class: "fo-screen", alt: "", width: 640, height: 400, hidden: true });
  const pictureNote = h("p", { class: "muted small fo-screen-note", role: "status", text: "Loading the console picture…" });
  let pictureAt = null;
  picture.addEventListener("load", () => {
    picture.hidden = false;
    pictureAt = new Date();
    pictureNote.textContent = info.live ? `Refreshed every 3 s · last at ${time(pictureAt.toISOString())}` : "The last picture kept; the VM is not running.";
  });
  picture.addEventListener("error", () => {
    if (!pictureAt) {
      picture.hidden = true;
      pictureNote.textContent = ACTIVE.has(info.state) ? "No picture of the console yet: QEMU is starting." : "No picture of the console was kept.";
    }
  });
  const loadPicture = () => {
    picture.alt = `Console of ${info.asset}`;
    picture.src = scoped(`${base}/screenshot?t=${Date.now()}`);
  };
  const consoleCard = card("Console", { subtitle: "What the VM's screen shows", className: "fo-console" }, h("div", { class: "card-body" }, h("div", { class: "fo-screen-frame" }, picture), pictureNote));

  // Admins and operators get the live console (the screenshot while it is not connected).
  const screenPanel = view.can("operator") ? liveConsole(view, { sessionId, asset: info.asset, picture: consoleCard, session: () => info }) : null;

  const serial = h("pre", { class: "fo-serial", tabindex: "0", "aria-label": `Serial console of ${info.asset}` });
  const serialNote = h("p", { class: "muted small", text: "" });
  const serialCard = card("Serial console", { subtitle: "The newest lines the guest wrote to its serial port" }, h("div", { class: "card-body" }, serial, serialNote));
  async function loadSerial() {
    try {
      const text = await getText(`${base}/serial?max_bytes=16384`);
      const atEnd = serial.scrollHeight - serial.scrollTop - serial.clientHeight < 24;
      // the tail starts mid-line: drop the partial first line of a cut log
      const lines = text.split("\n");
      const shown = text.length >= 16384 ? lines.slice(1) : lines;
      serial.textContent = shown.join("\n").replace(/\r/g, "");
      serialNote.textContent = text ? "" : "Nothing on the serial console yet.";
      serialNote.hidden = Boolean(text);
      if (atEnd) serial.scrollTop = serial.scrollHeight;
    } catch (err) {
      serialNote.textContent = humanError(err).title;
      serialNote.hidden = false;
    }
  }

  // --- the actions ---

  const jobs = new Map(); // job id -> {job, row}
  const pending = () => [...jobs.values()].some((j) => !JOB_DONE.has(j.job.state));

  function availability() {
    const d = info.details || {};
    const role = view.can("operator") ? null : "Needs the operator role.";
    const busyNote = pending() ? "Wait until the action you started has finished." : null;
    let stop = null;
    if (!["booting", "running"].includes(info.state)) {
      stop = { starting: "The failover is still preparing; stop it once it boots.", migrating: "Wait until the move to local disk has finished.", stopping: "It is already stopping." }[info.state] || "The VM is not running.";
    } else if (!info.live) stop = "This VM is not run by this appliance process.";
    let migrate = null;
    if (info.purpose === "boot_test") migrate = "A boot test is shut down after its proof; fail over to keep a VM running.";
    else if (info.state === "running" && info.storage === "local") migrate = "It already runs on local disk.";
    else if (info.state !== "running") migrate = { booting: "Wait until the boot is proven.", starting: "Wait until the boot is proven.", migrating: "It is moving right now." }[info.state] || "Only a running VM can be moved.";
    else if (!info.live) migrate = "This VM is not run by this appliance process.";
    let failback = null;
    if (info.purpose === "boot_test") failback = "A boot test's disks are discarded after the test.";
    else if (d.discarded_at) failback = "This session's disks were deleted.";
    else if (!d.proven_at) failback = ACTIVE.has(info.state) ? "Wait until the boot is proven." : "The VM never booted, so it changed nothing to keep.";
    else if (["starting", "booting", "migrating", "stopping"].includes(info.state)) failback = "Wait until the VM is running or stopped.";
    return {
      stop: role || busyNote || stop,
      migrate: role || busyNote || migrate,
      failback: role || busyNote || failback,
    };
  }

  function actionRow(label, why, reason, onClick, kind = "") {
    const btn = button(label, { kind, disabled: Boolean(reason), onClick, "aria-describedby": null });
    const note = h("p", { class: reason ? "help fo-why" : "help", text: reason ? `Not available: ${reason}` : why });
    const id = `fo-${label.toLowerCase().replace(/\W+/g, "-")}-note`;
    note.id = id;
    btn.setAttribute("aria-describedby", id);
    return h("div", { class: "fo-action" }, btn, note);
  }

  let actionsSignature = null;
  function drawActions() {
    const a = availability();
    const signature = JSON.stringify(a);
    if (signature === actionsSignature) return;
    actionsSignature = signature;
    replace(
      actionsBox,
      card(
        "Actions",
        { subtitle: "Each runs as a job; you are asked before anything happens" },
        h(
          "div",
          { class: "card-body fo-actions" },
          actionRow("Stop", "Power the VM down. Its changes stay until you fail back or delete them.", a.stop, stopDialog, "danger"),
          actionRow("Move to local disk", "Copy the disks off the backup while the VM runs; then it no longer needs the backup.", a.migrate, migrateDialog),
          actionRow("Fail back", "Keep what changed: a new recovery point, and/or the disks written back to an image.", a.failback, failbackDialog, "primary"),
        ),
      ),
    );
  }

  function remember(jobId) {
    try {
      const key = storageKey(sessionId);
      const known = JSON.parse(sessionStorage.getItem(key) || "[]");
      if (!known.includes(jobId)) sessionStorage.setItem(key, JSON.stringify([...known, jobId].slice(-10)));
    } catch {
      // private mode: the list is then only kept while this screen is open
    }
  }

  function drawJob(entry) {
    const { job } = entry;
    const stateText = { queued: "Queued", running: "Running", succeeded: "Done", failed: "Failed", cancelled: "Cancelled", interrupted: "Interrupted" }[job.state] || job.state;
    const tone = { succeeded: "good", failed: "bad", running: "info", interrupted: "warn" }[job.state] || "neutral";
    const what = { failover_stop: "Stop", failover_migrate: "Move to local disk", failover_failback: "Fail back" }[job.kind] || capitalise(String(job.description || job.kind));
    replace(
      entry.row,
      h("div", { class: "fo-job-head" }, h("strong", { text: what }), pill(stateText, tone), h("a", { href: `#/jobs/${enc(job.id)}`, class: "small", text: `Job ${shortId(job.id)}` }), h("span", { class: "muted small", text: dateTime(job.created_at) })),
      jobOutcome(job, info),
    );
    entry.row.dataset.state = job.state;
    entry.row.dataset.kind = job.kind;
  }

  async function watchJob(entry) {
    try {
      entry.job = await api.get(`/api/jobs/${enc(entry.job.id)}`);
    } catch {
      // the next round tries again
    }
    drawJob(entry);
    if (JOB_DONE.has(entry.job.state)) {
      await refresh();
      return;
    }
    later(() => watchJob(entry), JOB_POLL_MS);
  }

  function track(job, { fresh = true } = {}) {
    if (jobs.has(job.id)) return;
    const row = h("li", { class: "fo-job", dataset: { job: job.id } });
    const entry = { job, row };
    jobs.set(job.id, entry);
    jobList.insertBefore(row, jobList.firstChild);
    jobsCard.hidden = false;
    drawJob(entry);
    if (fresh) remember(job.id);
    drawActions();
    if (!JOB_DONE.has(job.state)) later(() => watchJob(entry), JOB_POLL_MS);
  }

  async function submit(path, body, label) {
    // The job's row under "What you started here" says it started and, later, how it ended; a
    // toast beside it would stay green when the start then fails.
    const job = await api.post(path, body);
    track(job);
    schedulePoll(0);
  }

  function stopDialog() {
    const discard = h("input", { type: "checkbox", name: "discard" });
    formDialog({
      title: `Stop ${info.asset}?`,
      description: "The VM gets the ACPI power button; if it has not shut down after 30 s, QEMU is told to quit. Everything running in the VM stops.",
      submitLabel: "Stop the VM",
      danger: true,
      body: h("label", { class: "fo-check" }, discard, h("span", "Also delete what the VM changed (no failback possible afterwards)")),
      onSubmit: () => submit(`${base}/stop`, discard.checked ? { discard: true } : {}, `Stop of ${info.asset}`),
    });
  }

  function migrateDialog() {
    formDialog({
      title: `Move ${info.asset} to local disk?`,
      description: "The VM keeps running while its disks are copied from the backup to the appliance's local storage; then it switches over and no longer needs the backup store.",
      submitLabel: "Move to local disk",
      body: field({ label: "Folder for the disks (optional)", name: "target_dir", placeholder: "the session's folder", help: "A folder inside a restore area (Settings), as a full path. Empty: the appliance's failover folder." }),
      onSubmit: (form) => {
        const dir = form.elements.target_dir.value.trim();
        return submit(`${base}/migrate`, dir ? { target_dir: dir } : {}, `Move of ${info.asset}`);
      },
    });
  }

  function failbackDialog() {
    const newPoint = h("input", { type: "checkbox", name: "new_point", checked: true });
    const radios = h(
      "fieldset",
      { class: "field" },
      h("legend", { class: "label", text: "Write the disks back" }),
      [
        ["none", "No", "Only the recovery point"],
        ["original", "To the original disk images", "Overwrites the images the backup was made from"],
        ["path", "To a new image file", "Inside a restore area, or a registered restore device"],
      ].map(([value, label, help]) =>
        h("label", { class: "radio fo-radio" }, h("input", { type: "radio", name: "write", value, checked: value === "none" }), h("span", h("strong", { text: label }), h("small", { class: "muted", text: help }))),
      ),
    );
    const pathPart = h(
      "div",
      { class: "grid-2" },
      field({ label: "Image file", name: "write_path", placeholder: "/var/lib/appliance/restores/web-failback.img", help: "A full path inside a restore area (or a restore device). For a VM with several disks: a folder." }),
      field({ label: "Format", control: select("format", [["raw", "Raw"], ["qcow2", "QCOW2"]], "raw") }),
    );
    const formatOnly = field({ label: "Format", control: select("format_original", [["raw", "Raw"], ["qcow2", "QCOW2"]], "raw") });
    const show = (value) => {
      pathPart.hidden = value !== "path";
      formatOnly.hidden = value !== "original";
    };
    show("none");
    radios.addEventListener("change", (e) => show(e.target.value));
    formDialog({
      title: `Fail back ${info.asset}`,
      description: ACTIVE.has(info.state) ? "The VM is powered down first. Then what it changed while running here is kept as you choose." : "What the VM changed while it ran here is kept as you choose.",
      submitLabel: "Fail back",
      wide: true,
      body: h("div", h("label", { class: "fo-check field" }, newPoint, h("span", `Make a new recovery point of ${info.asset} from the disks as they are now`)), radios, pathPart, formatOnly),
      onSubmit: (form) => {
        const write = form.elements.write.value;
        const body = { new_point: newPoint.checked };
        if (write === "original") {
          body.write_to = "original";
          body.format = form.elements.format_original.value;
        } else if (write === "path") {
          const path = form.elements.write_path.value.trim();
          if (!path.startsWith("/")) throw new ApiError(400, "invalid_input", "give the image file as a full path, starting with /", { field: "write_path" });
          body.write_to = path;
          body.format = form.elements.format.value;
        }
        if (!body.new_point && !body.write_to) throw new ApiError(400, "invalid_input", "choose a new recovery point, writing the disks back, or both");
        return submit(`${base}/failback`, body, `Failback of ${info.asset}`);
      },
    });
  }

  // --- drawing the session ---

  function drawHead() {
    const purpose = PURPOSE_NAMES[info.purpose] || capitalise(info.purpose);
    view.setTitle(`${purpose} of ${info.asset}`);
    const live = info.live ? h("span", { class: "live", title: "Running in this appliance now" }, h("span", { class: "live-dot" }), "Live") : null;
    replace(headBox, pageHeader(`${purpose} of ${info.asset}`, `Session ${shortId(info.id)} · started ${dateTime(info.started_at)}`, live, button("Failover settings", { href: `#/assets/${enc(info.asset)}/failover-settings`, kind: "small" }), button("All sessions", { href: "#/failover", kind: "small" })));
  }

  function drawHero() {
    const words = stateWords(info);
    const d = info.details || {};
    const rto = rtoText(info.rto_seconds);
    let rtoNote = "from the click to the boot proof";
    if (!rto && ACTIVE.has(info.state)) {
      const since = secondsSince(d.requested_at || info.started_at);
      rtoNote = since !== null ? `${duration(since)} since the click; measured when the boot is proven` : "measured when the boot is proven";
    } else if (!rto) rtoNote = "not measured: the boot was never proven";
    replace(
      heroBox,
      h(
        "section",
        { class: `card fo-hero fo-${words.tone}`, "aria-label": "Status" },
        h(
          "div",
          { class: "fo-status" },
          h("span", { class: "fo-label", text: "State" }),
          h("p", { class: "fo-state", role: "status", text: words.label }),
          words.text ? h("p", { class: "muted", text: words.text }) : null,
        ),
        h(
          "div",
          { class: "fo-rto" },
          h("span", { class: "fo-label", text: "Recovery time (RTO)" }),
          h("p", { class: "fo-rto-value", text: rto || "—" }),
          h("p", { class: "muted small", text: rtoNote }),
        ),
      ),
    );
  }

  let detailsSignature = null;
  function drawDetails() {
    const d = info.details || {};
    const signature = JSON.stringify([info.state, info.storage, info.ports, info.addresses, info.accel, d.checks, d.proof, d.export_stats, d.failback, d.stopped_by, d.boot_seconds, d.local_disks]);
    if (signature === detailsSignature) return;
    detailsSignature = signature;
    // the forwards listen only while QEMU runs
    const running = ACTIVE.has(info.state);
    const url = running ? healthUrl(info) : null;
    const rows = [
      ["Asset", h("span", h("strong", { text: info.asset }), " · ", h("a", { href: `#/points?asset=${enc(info.asset)}`, text: "its points" }))],
      ["Recovery point", pointLink(info.point_id)],
      ["Read from", d.read_from ? `the copy at ${d.read_from} (the job log names any switch to another copy)` : null],
      ["Accelerator", accelText(info.accel)],
      ["Storage", storageText(info)],
      ...networkRows(info, running),
      ["Health page", url ? h("span", h("a", { href: url, class: "mono", target: "_blank", rel: "noopener", text: url }), h("span", { class: "muted small block", text: "on the appliance itself (the forwards listen on its loopback)" })) : null],
      ["Boot proof", proofText(d.proof)],
      ["Proven", checksText(d.checks)],
      ["Boot time", d.boot_seconds !== undefined ? `${Number(d.boot_seconds).toFixed(1)} s from QEMU's start` : null],
      ["Read from the backup", readText(d.export_stats)],
      [
        "Last failback",
        d.failback ? h("span", d.failback.point ? ["new point ", pointLink(d.failback.point)] : null, (d.failback.written || []).length ? `${d.failback.point ? "; " : ""}written to ${d.failback.written.join(", ")}` : null, d.failback.at ? ` (${dateTime(d.failback.at)})` : null) : null,
      ],
    ].filter(([, v]) => v !== null && v !== undefined && v !== "");
    replace(detailsBox, card("Details", {}, h("dl", { class: "dl fo-dl" }, rows.map(([k, v]) => [h("dt", { text: k }), h("dd", v instanceof Node ? v : { text: String(v) })]))));
  }

  function draw() {
    drawHead();
    drawHero();
    drawDetails();
    drawActions();
  }

  // --- polling ---

  let pollTimer = null;
  let pictureRunning = false;
  function pictureLoop() {
    pictureRunning = ACTIVE.has(info.state);
    if (!pictureRunning) return;
    if (info.live) loadPicture();
    later(pictureLoop, PICTURE_MS);
  }
  function schedulePoll(ms) {
    if (disposed) return;
    if (pollTimer !== null) {
      clearTimeout(pollTimer);
      timers.delete(pollTimer);
    }
    pollTimer = setTimeout(() => {
      timers.delete(pollTimer);
      pollTimer = null;
      if (!disposed) refresh();
    }, ms);
    timers.add(pollTimer);
  }

  let refreshing = false;
  async function refresh() {
    if (disposed || refreshing) return;
    refreshing = true;
    const wasActive = ACTIVE.has(info.state);
    try {
      info = await api.get(base);
      draw();
      screenPanel?.update();
      const nowActive = ACTIVE.has(info.state);
      if (nowActive || wasActive) await loadSerial();
      if (wasActive && !nowActive) loadPicture(); // the last picture kept
      if (nowActive && !pictureRunning) pictureLoop();
    } catch (err) {
      view.banner.error(err);
    } finally {
      refreshing = false;
    }
    if (ACTIVE.has(info.state) || pending()) schedulePoll(SESSION_POLL_MS);
  }

  draw();
  replace(view.el, headBox, heroBox, h("div", { class: "fo-grid" }, screenPanel ? screenPanel.element : consoleCard, detailsBox), actionsBox, jobsCard, serialCard);
  if (ACTIVE.has(info.state)) pictureLoop();
  else loadPicture();
  await loadSerial();
  serial.scrollTop = serial.scrollHeight;
  try {
    const known = JSON.parse(sessionStorage.getItem(storageKey(sessionId)) || "[]");
    const found = await Promise.all(known.map((id) => api.get(`/api/jobs/${enc(id)}`).catch(() => null)));
    for (const job of found) if (job) track(job, { fresh: false });
  } catch {
    // nothing remembered
  }
  if (ACTIVE.has(info.state) || pending()) schedulePoll(SESSION_POLL_MS);
}
