// The live console of a failed-over VM, for admins and operators: its screen, keyboard and mouse.
//
// noVNC (Debian's novnc package, served read-only under /api/console/novnc/) speaks VNC over a
// WebSocket to /api/failover/<id>/console; the service relays it to QEMU's VNC socket. The
// browser sends the session cookie with the WebSocket, and the service checks that the page
// opening it is its own. Ctrl-Alt-Del and "Paste as keystrokes" go through the API instead
// (QMP send-key): the browser's own machine would catch Ctrl-Alt-Del, and a VM has no clipboard.
// Whenever the live console is not connected (VM not running, noVNC missing, connection lost),
// the screenshot card is shown as before.

import { api, enc, humanError } from "../api.js";
import { h } from "../dom.js";
import { count } from "../format.js";
import { button, card, toast } from "../ui.js";

const NOVNC = "/api/console/novnc/core/rfb.js";
const RUNNING = new Set(["booting", "running", "migrating"]);
const PASTE_LIMIT = 2000;

let rfbModule = null;
async function loadRfb() {
  if (!rfbModule) rfbModule = import(NOVNC).then((m) => m.default);
  try {
    return await rfbModule;
  } catch (err) {
    rfbModule = null;
    throw err;
  }
}

function socketUrl(sessionId) {
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${window.location.host}/api/failover/${enc(sessionId)}/console`;
}

/**
 * The console panel: a live screen while the VM runs, else `picture` (the screenshot card).
 * `session()` returns the session as last read; the view calls `update()` after each read, which
 * connects once the VM runs (the service closes the console itself when the VM stops).
 */
export function liveConsole(view, { sessionId, asset, picture, session }) {
  const base = `/api/failover/${enc(sessionId)}/console`;
  const isRunning = () => Boolean(session().live) && RUNNING.has(session().state);
  let rfb = null;
  let disposed = false;
  let connecting = false;
  let auto = true; // connect by itself until a console ends; then "Connect again" is the user's
  let scale = true;

  const status = h("p", { class: "muted small console-status", role: "status", text: "" });
  const screen = h("div", { class: "console-screen", "aria-label": `Screen of ${asset}` });
  const frame = h("div", { class: "console-frame" }, screen);
  const connectBtn = button("Connect again", { iconName: "refresh", onClick: () => connect() });
  connectBtn.hidden = true;

  const cadBtn = button("Ctrl-Alt-Del", { title: "Send Ctrl-Alt-Del to the VM", onClick: () => sendKeys({ combo: "ctrl-alt-delete" }, cadBtn) });
  const pasteBtn = button("Paste as keystrokes", { onClick: () => togglePaste() });
  const scaleBtn = button("Actual size", { onClick: () => setScale(!scale) });
  const fullBtn = button("Full screen", { onClick: () => frame.requestFullscreen?.().catch(() => {}) });
  const controls = [cadBtn, pasteBtn, scaleBtn, fullBtn];

  const pasteText = h("textarea", { class: "console-paste-text", rows: 3, maxlength: PASTE_LIMIT, "aria-label": "Text to type into the VM" });
  const typeBtn = button("Type it", { kind: "primary", onClick: () => typeText() });
  const pasteBox = h(
    "div",
    { class: "console-paste" },
    h("label", { text: "Text to type into the VM" }),
    pasteText,
    h("p", { class: "muted small", text: "Typed key by key on a US keyboard layout (letters, digits, punctuation, Enter and Tab). Only the number of keys is logged, never the text." }),
    h("div", { class: "console-paste-actions" }, typeBtn),
  );
  pasteBox.hidden = true;

  const liveCard = card(
    "Console",
    { subtitle: "The VM's screen, live: click it, then type", className: "fo-console console-live", actions: controls },
    h("div", { class: "card-body" }, frame, status, connectBtn, pasteBox),
  );
  const element = h("div", { class: "console-panel" }, liveCard, picture);

  function showLive(live) {
    liveCard.hidden = !live;
    picture.hidden = live;
  }

  function setStatus(text) {
    status.textContent = text;
  }

  function setScale(on) {
    scale = on;
    scaleBtn.querySelector("span").textContent = on ? "Actual size" : "Scale to fit";
    if (rfb) rfb.scaleViewport = on;
  }

  function togglePaste() {
    pasteBox.hidden = !pasteBox.hidden;
    if (!pasteBox.hidden) pasteText.focus();
  }

  async function sendKeys(body, btn) {
    btn.disabled = true;
    try {
      const done = await api.post(`${base}/keys`, body);
      if (body.combo) toast("Ctrl-Alt-Del sent to the VM.");
      else toast(`${count(done.keys, "key")} typed into the VM.`);
      return done;
    } catch (err) {
      view.banner.error(err);
      return null;
    } finally {
      btn.disabled = false;
    }
  }

  async function typeText() {
    const text = pasteText.value;
    if (!text) {
      pasteText.focus();
      return;
    }
    const done = await sendKeys({ text }, typeBtn);
    if (done) {
      pasteText.value = "";
      pasteBox.hidden = true;
      rfb?.focus();
    }
  }

  async function connect() {
    connectBtn.hidden = true;
    if (!isRunning() || connecting || rfb) {
      if (!rfb) showLive(false);
      return;
    }
    showLive(true);
    setStatus("Connecting to the console…");
    let RFB;
    connecting = true;
    try {
      RFB = await loadRfb();
    } catch {
      auto = false;
      showLive(false);
      picture.before(h("p", { class: "banner banner-warning console-missing", role: "status", text: "The live console needs noVNC on the appliance: install the Debian package novnc (apt-get install novnc). Until then the screenshot below is shown." }));
      return;
    } finally {
      connecting = false;
    }
    if (disposed) return;
    screen.replaceChildren();
    try {
      rfb = new RFB(screen, socketUrl(sessionId), { wsProtocols: ["binary"], shared: true });
    } catch (err) {
      setStatus(humanError(err).title);
      connectBtn.hidden = false;
      return;
    }
    rfb.scaleViewport = scale;
    rfb.background = "#0b1220";
    rfb.addEventListener("connect", () => {
      setStatus("Connected. Click the screen to type; keys go to the VM until you click elsewhere.");
      screen.dataset.connected = "true";
    });
    rfb.addEventListener("disconnect", (e) => {
      rfb = null;
      auto = false;
      screen.dataset.connected = "false";
      if (disposed) return;
      if (!isRunning()) {
        setStatus("The VM stopped; its console is closed.");
        showLive(false);
        return;
      }
      setStatus(e.detail?.clean ? "The console was closed." : "The console connection was lost (it may have been idle too long, or the console limit was reached).");
      connectBtn.hidden = false;
    });
  }

  view.onDispose(() => {
    disposed = true;
    if (rfb) rfb.disconnect();
  });

  showLive(false);
  connect();
  return {
    element,
    update() {
      if (auto && !rfb && isRunning()) connect();
    },
  };
}
