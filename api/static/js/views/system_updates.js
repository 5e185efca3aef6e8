// Settings, "System": the running release, the one it falls back to, what changed, and updates.
//
// An update is a release bundle (.tar) uploaded as the request body with XMLHttpRequest, the one
// browser API that reports upload progress. The service validates it and starts the upgrade
// outside itself (it restarts the service); the card then polls GET /api/system/release while
// the upgrade runs, through the restart, until the history shows "upgraded" or "rolled back".

import { ApiError, api } from "../api.js";
import { h, replace } from "../dom.js";
import { dateTime, duration } from "../format.js";
import { button, card, loading, pill, progressBar } from "../ui.js";

const POLL_MS = 2000;
const OUTCOME_TONES = { upgraded: "good", "rolled back": "warn", failed: "bad", interrupted: "warn", queued: "neutral", running: "info" };

function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "appliance_csrf") return decodeURIComponent(rest.join("="));
  }
  return "";
}

/** POST the file as the body; onProgress(fraction). Resolves with the JSON answer. */
function uploadBundle(file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/system/update");
    xhr.setRequestHeader("Content-Type", "application/x-tar");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.upload.onprogress = (e) => onProgress(e.lengthComputable ? e.loaded / e.total : null);
    xhr.onerror = () => reject(new ApiError(0, "network", "the appliance cannot be reached"));
    xhr.onload = () => {
      let body = {};
      try {
        body = JSON.parse(xhr.responseText || "{}");
      } catch {
        body = {};
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body.code || "error", body.message || `HTTP ${xhr.status}`, body.details));
    };
    xhr.send(file);
  });
}

function stepList(attempt) {
  return h(
    "ol",
    { class: "upgrade-steps" },
    ...(attempt.steps || []).map((s) =>
      h("li", {}, `${s.name}: ${s.state}`, s.seconds != null ? ` (${duration(s.seconds)})` : "", s.detail ? h("span", { class: "muted small", text: ` ${s.detail}` }) : null),
    ),
  );
}

function attemptLine(a) {
  const what = `${a.from_version || "none"} → ${a.to_version || "?"}`;
  return h(
    "li",
    {},
    pill(a.outcome, OUTCOME_TONES[a.outcome] || "neutral"),
    ` ${what}, ${a.finished ? dateTime(a.finished) : dateTime(a.started)}`,
    a.seconds != null ? ` (${duration(a.seconds)})` : "",
    a.reason ? h("div", { class: "muted small", text: a.reason }) : null,
    a.catalog_note ? h("div", { class: "muted small", text: a.catalog_note }) : null,
  );
}

function uploadControl(view, release, refresh) {
  if (!release.updates_from_page) {
    return h("p", { class: "muted", text: "Updates from the page need the appliance OS; in a checkout, git pull and restart the service." });
  }
  const input = h("input", { type: "file", accept: ".tar,application/x-tar", "aria-label": "Release bundle" });
  const status = h("div");
  const start = button("Upload update", {
    onClick: async () => {
      const file = input.files && input.files[0];
      if (!file) {
        replace(status, h("p", { class: "muted", text: "Choose a release bundle (.tar) first." }));
        return;
      }
      start.disabled = true;
      const bar = progressBar(0, "Upload");
      replace(status, bar);
      try {
        await uploadBundle(file, (fraction) => replace(status, progressBar(fraction, "Upload")));
        replace(status, h("p", { text: "Uploaded; the upgrade is running. The page may lose the appliance for a moment while the service restarts." }));
        refresh();
      } catch (err) {
        replace(status);
        view.banner.error(err);
      } finally {
        start.disabled = false;
      }
    },
  });
  return h("div", { class: "upload-update" }, input, start, status);
}

/** The "System" card of Settings (async content; polls while an upgrade runs). */
export function systemCard(view) {
  const body = h("div", loading());
  let timer = null;
  const refresh = async () => {
    clearTimeout(timer);
    let release;
    try {
      release = await api.get("/api/system/release");
    } catch (err) {
      // The service restarts during an upgrade: keep polling instead of reporting it.
      if (err instanceof ApiError && err.code === "network") timer = setTimeout(refresh, POLL_MS);
      else view.banner.error(err);
      return;
    }
    if (!body.isConnected && timer !== null) return; // the user left Settings
    const up = release.upgrade;
    replace(
      body,
      h(
        "dl",
        { class: "facts" },
        h("dt", { text: "Version" }),
        h("dd", { text: release.version }),
        h("dt", { text: "Previous version" }),
        h("dd", { text: release.previous_version || "none" }),
      ),
      up.current ? h("div", { class: "upgrade-running" }, h("h3", { text: "Upgrade in progress" }), attemptLine(up.current), stepList(up.current)) : null,
      view.session.role === "admin" && !up.running ? uploadControl(view, release, refresh) : null,
      up.history.length ? h("div", {}, h("h3", { text: "History" }), h("ul", { class: "upgrade-history" }, ...up.history.map(attemptLine))) : null,
      release.changelog ? h("details", {}, h("summary", { text: "What changed (changelog)" }), h("pre", { class: "changelog", text: release.changelog })) : null,
    );
    if (up.running) timer = setTimeout(refresh, POLL_MS);
  };
  refresh();
  return card("System", { subtitle: "The software release this appliance runs. An upgrade installs beside it and goes back by itself if the new release does not start." }, body);
}
