// "Recover this appliance from tapes" on the Tape screen (admin; api/tape_recovery.py): a fresh
// appliance, its store still empty, reads the lost appliance's store from the tapes with that
// store's recovery key, restarts on it and scans the tapes for its points.
//
// The card shows while a recovery may start (the API's `refusal` is null: an empty store, no job
// active) and while one runs or has just ended (its state is not idle). tape.js hands it each
// reading of GET /api/tape/recover it makes on its 5 s refresh; while a recovery is under way the
// card reads the state itself every second. While the service restarts on the recovered store
// (state "switching") the API answers 503 (code service_restarting) for a moment: the card shows
// that state and keeps polling, with no error. When a run ends the whole screen is redrawn.

import { api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { capitalise, dateTime } from "../format.js";
import { button, card, field, formDialog, pill, progressBar, select } from "../ui.js";

const POLL_MS = 1000;
const BUSY = new Set(["reading", "switching", "scanning"]);
const STATE_WORDS = {
  reading: ["Reading the tapes", "info"],
  switching: ["Restarting on the recovered store", "info"],
  scanning: ["Scanning the tapes for points", "info"],
  done: ["Recovered", "good"],
  failed: ["Failed", "bad"],
};
const WHAT_IT_DOES =
  "This replaces this appliance's empty store with the lost appliance's store, read from its tapes. " +
  "It needs the tapes in a library registered here (or in a tape drive) and the lost store's recovery key: the paper key printed when that appliance was set up.";

/** Whether a reading of GET /api/tape/recover is worth a card (see the module comment). */
export function showsRecovery(rec) {
  return Boolean(rec) && (rec.refusal === null || rec.state !== "idle");
}

function recoverDialog(drives, onStarted) {
  const key = field({
    label: "Recovery key",
    name: "recovery_key",
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    autocapitalize: "characters",
    class: "mono",
    placeholder: "ABCDEF-GHIJKL-…",
    help: "As printed on the lost appliance's paper key; dashes and spaces do not matter.",
  });
  formDialog({
    title: "Recover from tapes",
    description: `${WHAT_IT_DOES} The key is used for this run only; it is not kept.`,
    submitLabel: "Recover",
    body: h("div", field({ label: "Drive", control: select("drive", drives, drives[0][0]), help: "The drive that reaches the tapes (a library's drive loads them by itself)." }), key),
    onSubmit: async (form) => {
      const el = form.elements;
      const started = await api.post("/api/tape/recover", { drive: el.drive.value, recovery_key: el.recovery_key.value.trim() });
      onStarted(started);
    },
  });
}

function sentence(text) {
  const t = capitalise(String(text).trim());
  return /[.!?)]$/.test(t) ? t : `${t}.`;
}

function logList(lines) {
  if (!lines.length) return null;
  return h(
    "ol",
    { class: "log tape-recover-log", "aria-label": "What the recovery did" },
    lines.map((line) => h("li", { class: "log-line" }, h("span", { class: "log-msg", text: line }))),
  );
}

/**
 * The card, kept across the screen's redraws: `el` is put in the screen, `show(rec, drives)`
 * draws a reading. ctx: the Tape screen's (refresh, restoreFromTape, view).
 */
export function recoveryPanel(ctx) {
  const el = h("div", { class: "tape-recover" });
  let timer = null;
  let stopped = false;
  let drives = [];
  let last = null;
  ctx.view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });

  async function poll() {
    timer = null;
    let rec;
    try {
      rec = await api.get("/api/tape/recover");
    } catch (err) {
      if (stopped) return;
      // While the service restarts on the recovered store every route answers 503, this one
      // too (signing in reads the catalog): that is the "switching" state, shown as such. Any
      // other failure (a moment's network trouble) waits for the next reading.
      if (err.code === "service_restarting" && last && last.state !== "switching") draw({ ...last, state: "switching" });
      else timer = setTimeout(poll, POLL_MS);
      return;
    }
    if (stopped) return;
    const ended = !BUSY.has(rec.state);
    draw(rec);
    if (ended) ctx.refresh();
  }

  function follow(rec) {
    clearTimeout(timer);
    timer = null;
    if (!stopped && BUSY.has(rec.state)) timer = setTimeout(poll, POLL_MS);
  }

  function draw(rec) {
    last = rec;
    follow(rec);
    if (!showsRecovery(rec)) {
      replace(el);
      return;
    }
    const [words, tone] = STATE_WORDS[rec.state] || [null, "neutral"];
    const start = () => recoverDialog(drives, (started) => draw(started));
    const parts = [];
    if (rec.state === "idle") {
      parts.push(h("p", { text: WHAT_IT_DOES }));
      if (!drives.length) parts.push(h("p", { class: "muted", text: "No tape drive yet: register the library that holds the tapes (above), or connect a tape drive." }));
    } else {
      const when = rec.ended_at ? `Started ${dateTime(rec.started_at)}, ended ${dateTime(rec.ended_at)}` : rec.started_at ? `Started ${dateTime(rec.started_at)}` : null;
      parts.push(
        h(
          "div",
          { class: "tape-recover-status" },
          pill(words, tone),
          rec.drive ? h("span", { class: "muted small mono", text: rec.drive }) : null,
          when ? h("span", { class: "muted small", text: when }) : null,
        ),
      );
      if (BUSY.has(rec.state)) parts.push(progressBar(null, words));
      if (rec.message) parts.push(h("p", { class: rec.state === "failed" ? "banner banner-error" : "tape-recover-message", role: rec.state === "failed" ? "alert" : "status", text: sentence(rec.message) }));
      // A failed scan comes after the switch: the store is the recovered one, only the scan is
      // to be run again (Tape jobs, "Scan tapes…"); before it, nothing was changed.
      if (rec.state === "failed" && rec.scan_job) parts.push(h("p", { class: "muted small", text: "The store was recovered; its points are not all listed yet. Run “Scan tapes…” (Tape jobs) with the same drive." }));
      else if (rec.state === "failed" && rec.refusal === null) parts.push(h("p", { class: "muted small", text: "Nothing was changed. Check the key and the tapes, then try again." }));
      else if (rec.state === "failed") parts.push(h("p", { class: "muted small", text: `A new recovery cannot start: ${rec.refusal}.` }));
    }
    if (rec.state === "done") {
      parts.push(
        h(
          "p",
          { class: "tape-recover-done" },
          "This appliance runs on it now. See its points under ",
          h("a", { href: "#/points", text: "Recovery points" }),
          rec.scan_job ? [" (found by the ", h("a", { href: `#/jobs/${enc(rec.scan_job)}`, text: "tape scan" }), ")"] : null,
          ". They are on tape: restore one from tape to bring it home before restoring or booting it.",
        ),
      );
    }
    parts.push(logList(rec.log || []));
    const actions = [];
    // Once the switch happened (a scan job exists), a new recovery would replace the recovered store.
    if (rec.refusal === null && drives.length && (rec.state === "idle" || (rec.state === "failed" && !rec.scan_job))) {
      actions.push(button(rec.state === "failed" ? "Try again…" : "Recover from tapes…", { kind: "primary", onClick: start }));
    }
    if (rec.state === "done") {
      actions.push(button("Show the recovered points", { href: "#/points" }));
      if (ctx.restoreFromTape) actions.push(button("Restore from tape…", { onClick: () => ctx.restoreFromTape() }));
    }
    replace(
      el,
      card(
        "Recover this appliance from tapes",
        { subtitle: "For a fresh appliance that replaces a lost one.", actions, className: "tape-recover-card" },
        h("div", { class: "card-body tape-recover-body", dataset: { recoverState: rec.state } }, parts),
      ),
    );
  }

  return {
    el,
    /** Whether a recovery is under way (the screen then rides out the service's restart). */
    busy: () => BUSY.has(last && last.state),
    /** Draw a reading made by the screen's refresh (drives: [identity, words] of driveChoices). */
    show(rec, choices) {
      drives = choices;
      // While the card follows a run itself, the screen's slower reading would only repeat it.
      if (timer !== null && BUSY.has(rec.state)) return;
      draw(rec);
    },
  };
}
