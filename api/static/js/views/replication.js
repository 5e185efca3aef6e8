// Replication: this appliance's recovery points copied to a second appliance (a peer), and the
// appliances that replicate into this one (its sources). docs/replication.md is the contract.
//
// Two halves on one screen, because an appliance is often both:
// - "Peers" (this appliance as a source): GET /api/peers, one card per peer with its pinned
//   certificate's fingerprint (to compare with the peer's own page), whether it answered, the RPO
//   at the peer in the appliance's words, the last replication and the one under way. Pairing
//   takes the peer's address and the code its page shows.
// - "Sources" (this appliance as a peer): a pairing code to type on a source, with this
//   appliance's fingerprint to compare, and GET /api/replication/sources, one card per source
//   (each source's store is kept apart here).
//
// Fields the appliance adds later (a time window, clock skew, take-over) are drawn when present
// and left out silently when absent. Roles: administrators pair, change and unpair; operators
// start a replication (or fetch points back); viewers read.

import { api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { ago, bytes, capitalise, count, dateTime, secondsSince, shortId } from "../format.js";
import { busy, button, card, confirmDialog, emptyState, field, formDialog, loading, pageHeader, pill, toast } from "../ui.js";
import { facts, fingerprintEl, present, sentence, skewFact } from "./replication_words.js";
import { identityCard, sourceCard } from "./replication_sources.js";

/** How often the lists are read again: often while a replication is under way. */
const POLL_ACTIVE_MS = 4000;
const POLL_IDLE_MS = 30000;

// --- this appliance as a source: its peers --------------------------------------------------------------

/** Whether the peer answered; the link's state in the appliance's words where it says more
 * (a refused token, a changed certificate, a full peer: `status_code`, `status`). */
const LINK_PILLS = { token_refused: "Token refused", certificate_changed: "Certificate changed", full: "Full" };

function answeredFact(peer) {
  if (LINK_PILLS[peer.status_code]) return h("span", { class: "stack" }, pill(LINK_PILLS[peer.status_code], "bad"), h("span", { class: "small", text: sentence(peer.status) }));
  if (peer.online) return h("span", { class: "stack" }, pill("Answered", "good"), peer.last_seen_at ? h("span", { class: "muted small", text: `last ${ago(secondsSince(peer.last_seen_at))}` }) : null);
  const error = peer.last_replication && peer.last_replication.error;
  return h("span", { class: "stack" }, pill("Did not answer", "bad"), error ? h("span", { class: "small", text: sentence(error) }) : h("span", { class: "muted small", text: "when last asked; replications wait for it and go on when it answers" }));
}

function rpoFact(peer) {
  const none = peer.rpo_seconds === null || peer.rpo_seconds === undefined;
  return h("span", { class: none ? "muted" : null, text: sentence(peer.rpo || peer.rpo_words || "") });
}

function lastReplicationFact(peer) {
  const last = peer.last_replication || {};
  if (!last.at && !last.outcome) return h("span", { class: "muted", text: "None yet" });
  const tone = last.outcome === "succeeded" ? "good" : last.outcome === "failed" ? "bad" : "neutral";
  const parts = [last.at ? dateTime(last.at) : null, last.points !== null && last.points !== undefined ? count(last.points, "point") : null, last.bytes_sent !== null && last.bytes_sent !== undefined ? `${bytes(last.bytes_sent)} sent` : null].filter(Boolean);
  return h(
    "span",
    { class: "stack" },
    h("span", pill(capitalise(last.outcome || "unknown"), tone), " ", h("span", { text: parts.join(" · ") })),
    last.error ? h("span", { class: "small", text: sentence(last.error) }) : null,
    last.job ? h("a", { class: "small", href: `#/jobs/${enc(last.job)}`, text: "Its job" }) : null,
  );
}

const JOB_WORDS = { queued: "A replication is queued", running: "A replication is running", waiting: "A replication is waiting" };

function jobFact(peer) {
  const job = peer.job;
  if (!job) return h("span", { class: "muted", text: "Nothing under way" });
  const tone = job.state === "running" ? "info" : job.state === "waiting" ? "warn" : "neutral";
  return h(
    "span",
    { class: "stack" },
    h("span", pill(JOB_WORDS[job.state] || capitalise(job.state), tone), " ", h("a", { href: `#/jobs/${enc(job.id)}`, text: `job ${shortId(job.id)}` })),
    job.wait_reason ? h("span", { class: "small", text: sentence(job.wait_reason) }) : null,
  );
}

function windowText(peer) {
  const window = peer.window;
  if (!window || (!window.start && !window.end)) return "Any time";
  const span = `From ${window.start} to ${window.end} (this appliance's time)`;
  if (peer.window_open === true) return `${span}: open now`;
  if (peer.window_open === false) return `${span}: closed${peer.window_opens_at ? `, opens ${dateTime(peer.window_opens_at)}` : ""}`;
  return span;
}

function settingsFact(peer) {
  const parts = [
    peer.replicate_new ? "After each backup" : "Not after each backup",
    peer.catch_up_minutes ? `catch-up every ${count(peer.catch_up_minutes, "minute")}` : "no catch-up (only after backups and on demand)",
    peer.bandwidth_mib_s ? `at most ${peer.bandwidth_mib_s} MiB/s` : "no bandwidth limit",
  ];
  return h("span", { dataset: { settings: "" }, text: sentence(parts.join("; ")) });
}

function takeoverFact(peer, ctx) {
  if (!present(peer.takeover)) return null;
  const t = peer.takeover || {};
  let state = t.allowed ? h("span", pill("Allowed", "warn"), t.granted_at ? h("span", { class: "muted small", text: ` since ${dateTime(t.granted_at)}` }) : null) : pill("Not allowed", "neutral");
  if (t.revocation_pending) state = h("span", pill("Revoking", "warn"), h("span", { class: "small", text: " Withdrawn here; the peer has not confirmed yet (tried again when it answers)." }));
  if (t.error) state = h("span", { class: "stack" }, state, h("span", { class: "small", text: sentence(t.error) }));
  const explain = h("span", { class: "muted small", text: "Allowing it gives the peer this store's key, so the peer can open these points and run them if this appliance is lost; the peer then no longer holds only ciphertext." });
  if (!ctx.isAdmin) return ["Take-over", h("span", { class: "stack" }, state, explain), "takeover"];
  const toggle = h("input", { type: "checkbox", checked: Boolean(t.allowed), "aria-label": `Let ${peer.label} take over (fail over with this appliance's key)` });
  toggle.addEventListener("change", async () => {
    const allow = toggle.checked;
    toggle.disabled = true;
    try {
      await api.put(`/api/peers/${enc(peer.id)}/takeover`, { allow });
      toast(allow ? `${peer.label} may now take over.` : `${peer.label} may no longer take over.`);
      await ctx.reload();
    } catch (err) {
      toggle.checked = !allow;
      ctx.banner.error(err);
    } finally {
      toggle.disabled = false;
    }
  });
  return ["Take-over", h("span", { class: "stack" }, state, h("label", { class: "fo-check" }, toggle, h("span", { text: "Let this peer take over (fail over with this appliance's key)" })), explain), "takeover"];
}

function pairDialog(ctx) {
  formDialog({
    title: "Pair with a peer",
    description: "On the peer (the appliance that will hold the copies), open Replication and press “Show a pairing code”. Type its address and the code here; then compare the fingerprint both pages show.",
    submitLabel: "Pair",
    body: h(
      "div",
      field({ label: "Peer address", name: "address", required: true, placeholder: "https://dr.example:8443", class: "mono", spellcheck: "false", autocomplete: "off", help: "https://host:port of the peer's admin page." }),
      field({ label: "Pairing code", name: "code", required: true, placeholder: "ABCD-EFGH", class: "mono", spellcheck: "false", autocomplete: "off", help: "8 characters, valid 10 minutes, one use; case, spaces and dashes do not matter." }),
      field({ label: "Label", name: "label", placeholder: "dr", help: "How this appliance names the peer (optional)." }),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const peer = await api.post("/api/peers", { address: el.address.value.trim(), code: el.code.value.trim(), label: el.label.value.trim() });
      toast(`Paired with ${peer.peer_name || peer.label}. Compare the fingerprint with the peer's page.`);
      await ctx.reload();
    },
  });
}

function numberOrNull(input) {
  const text = String(input.value || "").trim();
  return text === "" ? null : Number(text);
}

function editDialog(peer, ctx) {
  const hasWindow = present(peer.window);
  const win = peer.window || {};
  formDialog({
    title: `Replication to ${peer.label}`,
    submitLabel: "Save",
    body: h(
      "div",
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Bandwidth limit (MiB/s)", name: "bandwidth_mib_s", type: "number", min: 0, step: "any", value: peer.bandwidth_mib_s ?? "", help: "Empty: no limit." }),
        field({ label: "Catch-up every (minutes)", name: "catch_up_minutes", type: "number", min: 0, max: 10080, step: 1, value: peer.catch_up_minutes ?? 15, help: "0: only after backups and when asked." }),
      ),
      h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "replicate_new", checked: Boolean(peer.replicate_new) }), h("span", { text: "Replicate after each backup" })),
      hasWindow
        ? h(
            "fieldset",
            { class: "field repl-window" },
            h("legend", { class: "label", text: "Time window (empty: any time)" }),
            h("div", { class: "grid-2" }, field({ label: "From (HH:MM)", name: "window_start", type: "time", value: win.start || "" }), field({ label: "Until (HH:MM)", name: "window_end", type: "time", value: win.end || "" })),
          )
        : null,
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const body = { bandwidth_mib_s: numberOrNull(el.bandwidth_mib_s), replicate_new: el.replicate_new.checked };
      const catchUp = numberOrNull(el.catch_up_minutes);
      if (catchUp !== null) body.catch_up_minutes = catchUp;
      if (hasWindow) {
        const start = el.window_start.value;
        const end = el.window_end.value;
        body.window = start || end ? { start, end } : null; // one time alone: the appliance says what is missing
      }
      await api.patch(`/api/peers/${enc(peer.id)}`, body);
      toast(`Replication to ${peer.label} saved.`);
      await ctx.reload();
    },
  });
}

function unpairPeer(peer, ctx) {
  confirmDialog({
    title: `Unpair ${peer.label}?`,
    text: `This appliance stops replicating to ${peer.label}: queued or waiting replications are cancelled, the peer is asked to revoke the replication token, the token is deleted here and the copies there are forgotten by this appliance (refused while a point is held only there). The peer keeps the replica until its administrator deletes it. If the peer does not answer, unpair this appliance on the peer's page too.`,
    confirmLabel: "Unpair",
    action: async () => {
      const removed = (await api.del(`/api/peers/${enc(peer.id)}`)) || {};
      const words = [
        present(removed.copies_forgotten) ? `${capitalise(count(removed.copies_forgotten, "copy", "copies"))} there forgotten here.` : null,
        removed.peer_answer ? sentence(removed.peer_answer) : null,
        removed.next ? sentence(removed.next) : null,
      ];
      ctx.banner.success(`Unpaired from ${peer.label}`, words.filter(Boolean).join(" "));
      await ctx.reload();
    },
  });
}

async function replicateNow(peer, btn, ctx) {
  const job = await busy(btn, ctx.banner, () => api.post(`/api/peers/${enc(peer.id)}/replicate`, {}));
  if (!job) return;
  toast(`Replication to ${peer.label}: ${job.state === "waiting" ? "waiting for the peer" : job.state}.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  await ctx.reload();
}

async function pullPoints(peer, btn, ctx) {
  const job = await busy(btn, ctx.banner, () => api.post(`/api/peers/${enc(peer.id)}/pull`, {}));
  if (!job) return;
  toast(`Fetching the points made on ${peer.label}.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  await ctx.reload();
}

function peerCard(peer, ctx) {
  const actions = [];
  if (ctx.canOperate) actions.push(button("Replicate now", { iconName: "play", kind: "primary", "aria-label": `Replicate to ${peer.label} now`, onClick: (e) => replicateNow(peer, e.currentTarget, ctx) }));
  if (ctx.canOperate && present(peer.takeover)) actions.push(button("Fetch points made on the peer (failback)", { iconName: "download", onClick: (e) => pullPoints(peer, e.currentTarget, ctx) }));
  if (ctx.isAdmin) {
    actions.push(button("Edit", { iconName: "edit", "aria-label": `Edit replication to ${peer.label}`, onClick: () => editDialog(peer, ctx) }));
    actions.push(button("Unpair", { iconName: "trash", kind: "danger", "aria-label": `Unpair ${peer.label}`, onClick: () => unpairPeer(peer, ctx) }));
  }
  const who = [peer.peer_name, peer.address].filter(Boolean).join(" at ");
  const rows = [
    ["Fingerprint", fingerprintEl(peer.fingerprint, `Fingerprint of ${peer.label}`), "fingerprint"],
    ["Peer appliance", peer.peer_appliance_id ? h("span", peer.peer_name ? `${peer.peer_name}, ` : null, h("span", { class: "mono small", text: peer.peer_appliance_id })) : null],
    ["Answered", answeredFact(peer), "answered"],
    ["RPO at the peer", rpoFact(peer), "rpo"],
    ["Points", h("span", { text: `${count(peer.points_at_peer, "point")} at the peer, ${peer.points_pending ? `${count(peer.points_pending, "point")} still to send` : "none to send"}` }), "points"],
    ["Last replication", lastReplicationFact(peer), "last"],
    ["Now", jobFact(peer), "job"],
    ["Replicates", settingsFact(peer), "settings"],
    present(peer.window) ? ["Time window", h("span", { text: windowText(peer) }), "window"] : null,
    skewFact(peer),
    takeoverFact(peer, ctx),
  ];
  const el = card(peer.label, { subtitle: who, actions, className: "repl-peer" }, h("div", { class: "card-body" }, facts(rows)));
  el.dataset.peer = peer.id;
  return el;
}

// --- the screen -----------------------------------------------------------------------------------------

function sectionHead(title, text, ...actions) {
  return h("div", { class: "repl-head" }, h("div", h("h2", { text: title }), h("p", { class: "muted small", text })), actions.length ? h("div", { class: "card-actions" }, actions) : null);
}

export default async function replicationView(view) {
  const peersBox = h("div", { class: "repl-list" }, loading());
  const sourcesBox = h("div", { class: "repl-list" }, loading());
  let peers = [];
  let sources = [];
  let timer = null;
  let stopped = false;
  const ctx = {
    isAdmin: view.can("admin"),
    canOperate: view.can("operator"),
    banner: view.banner,
    identity: null,
    stopCountdown: () => {},
    drawIdentity: () => {},
    async reload() {
      clearTimeout(timer);
      let failed = null;
      const [p, s] = await Promise.allSettled([api.get("/api/peers"), api.get("/api/replication/sources")]);
      if (p.status === "fulfilled") peers = p.value;
      else failed = p.reason;
      if (s.status === "fulfilled") sources = s.value;
      else failed = failed || s.reason;
      if (failed) view.banner.error(failed);
      // Until it has one: pairing as a source makes this appliance's certificate.
      if (!ctx.identity || !ctx.identity.fingerprint) {
        ctx.identity = await api.get("/api/replication/identity").catch(() => ctx.identity);
        ctx.drawIdentity();
      }
      draw();
      schedule();
    },
  };
  const pair = ctx.isAdmin ? button("Pair with a peer", { iconName: "link", kind: "primary", onClick: () => pairDialog(ctx) }) : null;
  const draw = () => {
    replace(
      peersBox,
      peers.length
        ? peers.map((p) => peerCard(p, ctx))
        : emptyState("link", "No peer yet", "Pair with a second appliance to keep up-to-date copies of this appliance's recovery points there, encrypted.", ...(pair ? [button("Pair with a peer", { iconName: "link", onClick: () => pairDialog(ctx) })] : [])),
    );
    replace(sourcesBox, sources.length ? sources.map((s) => sourceCard(s, ctx)) : h("p", { class: "muted repl-none", text: "No appliance replicates here yet." }));
  };
  const schedule = () => {
    if (stopped) return;
    const active = peers.some((p) => p.job && ["queued", "running"].includes(p.job.state));
    timer = setTimeout(() => ctx.reload().catch(() => {}), active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  };
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
    ctx.stopCountdown();
  });
  replace(
    view.el,
    pageHeader("Replication", "Up-to-date copies of this appliance's recovery points on a second appliance (a peer), and the appliances that copy theirs here. The peer holds them encrypted."),
    h(
      "section",
      { class: "repl-half", "aria-label": "Peers" },
      sectionHead("Peers", "Where this appliance's points are copied. Compare each fingerprint with the one on the peer's own page.", ...(pair ? [pair] : [])),
      peersBox,
    ),
    h("section", { class: "repl-half", "aria-label": "Sources" }, sectionHead("Sources", "The appliances that replicate into this one; each one's store is kept apart here."), identityCard(ctx), sourcesBox),
  );
  await ctx.reload();
}
