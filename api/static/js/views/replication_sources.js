// Replication, this appliance as a peer (docs/replication.md, "Pairing" and "Take over"): a
// one-time pairing code for a source to type, with this appliance's fingerprint to compare, and
// one card per source that replicates here (each source's store is kept apart): what it holds,
// how fresh, and the replica filesystem's space. When a source allowed it, an administrator takes
// its store over; the card then lists its newest points and links to the Points and Failover
// screens in that store's context (api.js setStore: every request then carries store=<id>).

import { api, currentStore, enc, setStore } from "../api.js";
import { h, replace } from "../dom.js";
import { ago, bytes, capitalise, count, dateTime, secondsSince, shortId } from "../format.js";
import { busy, button, card, confirmDialog, formDialog, loading, pill, table, toast } from "../ui.js";
import { ageWords, facts, fingerprintEl, present, sentence, skewFact, spacedCode } from "./replication_words.js";

function pairingCodeBox(ctx) {
  const box = h("div", { class: "repl-code-box" });
  const show = async (btn) => {
    const made = await busy(btn, ctx.banner, () => api.post("/api/replication/pairing-codes", {}));
    if (!made) return;
    ctx.identity = { fingerprint: made.fingerprint, appliance_id: made.appliance_id, name: made.name };
    ctx.drawIdentity();
    const left = h("span", { class: "repl-code-left" });
    const codeEl = h("output", { class: "pair-code mono", dataset: { code: made.code }, "aria-label": "Pairing code", text: spacedCode(made.code) });
    const tick = () => {
      const seconds = Math.round((new Date(made.expires_at).getTime() - Date.now()) / 1000);
      if (seconds <= 0) {
        left.textContent = "This code has expired: show a new one.";
        codeEl.classList.add("expired");
        return false;
      }
      left.textContent = `Valid for ${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")} more, for one pairing.`;
      return true;
    };
    tick();
    ctx.stopCountdown();
    const timer = setInterval(() => {
      if (!tick()) clearInterval(timer);
    }, 1000);
    ctx.stopCountdown = () => clearInterval(timer);
    replace(
      box,
      h(
        "div",
        { class: "repl-code", role: "region", "aria-label": "Pairing code" },
        codeEl,
        left,
        h("p", { class: "small", text: `On the source's Replication page, press “Pair with a peer” and type this code with this appliance's address${window.location.protocol === "https:" ? ` (${window.location.origin})` : ""}. Then check that the source shows the same fingerprint as this page:` }),
        fingerprintEl(made.fingerprint, "This appliance's fingerprint"),
      ),
    );
  };
  const btn = ctx.isAdmin ? button("Show a pairing code", { iconName: "key", kind: "primary", onClick: (e) => show(e.currentTarget) }) : null;
  return { box, btn };
}

export function identityCard(ctx) {
  const { box, btn } = pairingCodeBox(ctx);
  const known = h("div");
  ctx.drawIdentity = () => {
    const id = ctx.identity;
    replace(
      known,
      facts([
        ["This appliance's fingerprint", id ? fingerprintEl(id.fingerprint, "This appliance's fingerprint") : h("span", { class: "muted", text: "Loading…" }), "own-fingerprint"],
        id && id.appliance_id ? ["Appliance id", h("span", { class: "mono small", text: id.appliance_id })] : null,
      ]),
    );
  };
  ctx.drawIdentity();
  return card(
    "Pair a source with this appliance",
    { subtitle: "A source (an appliance whose points are to be copied here) pairs with a one-time code from this page.", actions: btn ? [btn] : [], className: "repl-identity" },
    h("div", { class: "card-body" }, known, box),
  );
}

function unpairSource(source, ctx) {
  const wipe = h("input", { type: "checkbox", name: "delete_data" });
  formDialog({
    title: `Unpair ${source.name}?`,
    body: h(
      "div",
      h("p", { text: `${source.name} can no longer replicate here: its replication token is revoked at once. Its replica (${bytes(source.bytes_held)}, ${count(source.points.count, "point")}) stays here unless you delete it below. Unpair this appliance on ${source.name}'s page too.` }),
      h("label", { class: "fo-check" }, wipe, h("span", { text: `Also delete the replica of ${source.name} here (its data and point summaries; cannot be undone)` })),
    ),
    submitLabel: "Unpair",
    danger: true,
    onSubmit: async () => {
      const deleted = wipe.checked;
      await api.del(`/api/replication/sources/${enc(source.appliance_id)}${deleted ? "?delete_data=1" : ""}`);
      ctx.banner.success(`Unpaired ${source.name}`, deleted ? "Its replica was deleted." : "Its replica stays here until an administrator deletes it.");
      await ctx.reload();
    },
  });
}

function storeLinks(source) {
  // the link's own click names the store for the banner; the address sets the context itself
  const enter = () => setStore({ id: source.store_id, name: source.name });
  const links = [
    button(`Open ${source.name}'s points`, { iconName: "points", href: `#/points?store=${enc(source.store_id)}` }),
    button("Fail over from its points", { iconName: "play", href: `#/failover?store=${enc(source.store_id)}` }),
  ];
  for (const link of links) link.addEventListener("click", enter);
  return h("div", { class: "repl-links" }, links);
}

async function takenOverPoints(source) {
  const box = h("div", { class: "repl-points" });
  try {
    const points = await api.get(`/api/points?store=${enc(source.store_id)}&limit=500`);
    const newest = (points || []).slice(-5).reverse();
    replace(
      box,
      newest.length
        ? table(
            [
              { label: "Point", cell: (p) => h("span", { class: "mono", title: p.id, text: shortId(p.id) }) },
              { label: "Asset", cell: (p) => p.asset },
              { label: "Made", cell: (p) => dateTime(p.created_at) },
            ],
            newest,
            { caption: `Newest points of ${source.name}`, rowAttrs: (p) => ({ dataset: { point: p.id } }) },
          )
        : h("p", { class: "muted", text: "No point in this store." }),
      (points || []).length > newest.length ? h("p", { class: "muted small", text: `The newest of ${count(points.length, "point")}.` }) : null,
    );
  } catch (err) {
    replace(box, h("p", { class: "muted small", text: `Its points could not be read here: ${sentence(err.message)}` }));
  }
  return box;
}

/** A slot that fills with the taken-over store's newest points once they are read. */
function pointsSlot(source) {
  const slot = h("div", loading("Reading its points…"));
  takenOverPoints(source).then((box) => replace(slot, box));
  return slot;
}

function takeoverSection(source, ctx) {
  if (!present(source.takeover) || !source.takeover) return { fact: null, actions: [], body: null };
  const t = source.takeover;
  let state;
  if (t.open) state = h("span", pill("Taken over", "warn"), h("span", { class: "small", text: ` since ${dateTime(t.opened_at)}: its store is open here with its key` }));
  else if (t.granted) state = h("span", pill("Allowed", "info"), h("span", { class: "small", text: ` by ${source.name}${t.granted_at ? ` on ${dateTime(t.granted_at)}` : ""}: this appliance may open its store with its key` }));
  else state = h("span", { class: "muted", text: `Not allowed by ${source.name}: this appliance holds its points encrypted and cannot open them.` });
  const actions = [];
  const path = `/api/replication/sources/${enc(source.appliance_id)}/takeover`;
  if (ctx.isAdmin && t.granted && !t.open) {
    actions.push(
      button("Take over", {
        iconName: "shield",
        kind: "primary",
        "aria-label": `Take over ${source.name}'s store`,
        onClick: () =>
          confirmDialog({
            title: `Take over ${source.name}'s store?`,
            text: `Its store is opened here with the key ${source.name} gave, so its points can be restored and its VMs run on this appliance. Do it when ${source.name} is lost or down; close the take-over when it is back.`,
            confirmLabel: "Take over",
            danger: false,
            action: async () => {
              const opened = await api.post(path, {});
              const n = (v) => (Array.isArray(v) ? v.length : Number(v || 0));
              ctx.banner.success(`${source.name}'s store is open here`, `${capitalise(count(n(opened && opened.points), "point"))} of ${count(n(opened && opened.assets), "asset")}. Open its points or fail over from them below.`);
              await ctx.reload();
            },
          }),
      }),
    );
  }
  if (ctx.isAdmin && t.open) {
    actions.push(
      button("Close take-over", {
        iconName: "close",
        "aria-label": `Close the take-over of ${source.name}'s store`,
        onClick: (e) =>
          busy(e.currentTarget, ctx.banner, async () => {
            await api.del(path);
            leaveStore(source);
            toast(`The take-over of ${source.name}'s store is closed.`);
            await ctx.reload();
          }),
      }),
    );
  }
  const body = t.open ? h("div", { class: "repl-taken" }, h("h3", { text: `${source.name}'s points` }), pointsSlot(source), storeLinks(source)) : null;
  return { fact: ["Take-over", state, "takeover"], actions, body };
}

/** A closed take-over leaves nothing to work on: drop the store context if it pointed there. */
function leaveStore(source) {
  const current = currentStore();
  if (current && current.id === source.store_id) setStore(null);
}

export function sourceCard(source, ctx) {
  const takeover = takeoverSection(source, ctx);
  const actions = [...takeover.actions];
  if (ctx.isAdmin) actions.push(button("Unpair", { iconName: "trash", kind: "danger", "aria-label": `Unpair ${source.name}`, onClick: () => unpairSource(source, ctx) }));
  const points = source.points || {};
  const space = source.free_bytes === null || source.free_bytes === undefined ? null : `${bytes(source.free_bytes)} free${source.reserve_bytes ? `, of which ${bytes(source.reserve_bytes)} is kept in reserve` : ""} (shared by every source's replica)`;
  const rows = [
    ["Fingerprint", fingerprintEl(source.fingerprint, `Fingerprint of ${source.name}`), "fingerprint"],
    ["Appliance id", h("span", { class: "mono small", text: source.appliance_id }), "appliance"],
    ["Store id", h("span", { class: "mono small", text: source.store_id }), "store"],
    ["Paired", source.paired_at ? dateTime(source.paired_at) : "—"],
    ["Last seen", source.last_seen ? `${dateTime(source.last_seen)} (${ago(secondsSince(source.last_seen))})` : h("span", { class: "muted", text: "Not yet" }), "seen"],
    ["Held here", bytes(source.bytes_held), "held"],
    ["Points", h("span", { text: `${count(points.count, "point")}; ${ageWords(points.newest_age_seconds)}` }), "points"],
    ["Space for replicas", space, "space"],
    skewFact(source),
    takeover.fact,
  ];
  const el = card(source.name, { subtitle: source.paired_at ? `Paired ${dateTime(source.paired_at)}` : null, actions, className: "repl-source" }, h("div", { class: "card-body" }, facts(rows), takeover.body));
  el.dataset.source = source.appliance_id;
  return el;
}
