// Replication in words: the pieces both halves of the Replication screen draw (views/replication.js
// for the peers of this appliance, views/replication_sources.js for the sources that replicate
// here): fingerprints, facts lists, clock skew and ages as the appliance words them.

import { h, icon } from "../dom.js";
import { capitalise, duration } from "../format.js";

/** A clock that differs by more than this is worth a warning (ages and expiries use both). */
const SKEW_WARN_SECONDS = 60;

export function sentence(text) {
  const t = capitalise(String(text || "").trim());
  if (!t) return "";
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

export function present(value) {
  return value !== undefined;
}

/** The code as it is read aloud: "ABCD-EFGH" (dashes and spaces are ignored when typed). */
export function spacedCode(code) {
  const c = String(code || "");
  return c.length === 8 ? `${c.slice(0, 4)}-${c.slice(4)}` : c;
}

export function fingerprintEl(value, label) {
  if (!value) return h("span", { class: "muted", text: "None (this appliance serves no certificate)" });
  return h("code", { class: "mono fingerprint", "aria-label": label, dataset: { fingerprint: value }, text: value });
}

/** A definition list from [label, value] pairs; a null value leaves its row out. */
export function facts(rows, className = "") {
  return h(
    "dl",
    { class: ["dl repl-facts", className] },
    rows.filter((r) => r && r[1] !== null && r[1] !== undefined).map(([k, v, key]) => [h("dt", { text: k }), h("dd", { dataset: key ? { fact: key } : null }, v)]),
  );
}

function skewText(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return null;
  const s = Number(seconds);
  if (Math.abs(s) < 1) return "In step with this appliance";
  return `${duration(Math.abs(s))} ${s > 0 ? "ahead of" : "behind"} this appliance`;
}

export function skewFact(item) {
  if (!present(item.clock_skew_seconds)) return null;
  const words = skewText(item.clock_skew_seconds);
  // the appliance words its own warning (`clock_skew`, null while the skew is harmless)
  const warning = present(item.clock_skew) ? item.clock_skew : Math.abs(Number(item.clock_skew_seconds)) > SKEW_WARN_SECONDS ? "times and ages shown may be off by that much" : null;
  if (!words) return ["Clock", h("span", { class: "muted", text: "Not known yet" }), "skew"];
  return ["Clock", h("div", { class: "stack" }, h("span", { text: words }), warning ? h("span", { class: "repl-warn", role: "note" }, icon("alert"), ` ${sentence(warning)}`) : null), "skew"];
}

/** The age of the newest point held here, as the peers list says it at the source. */
export function ageWords(seconds) {
  if (seconds === null || seconds === undefined) return "no point held here yet";
  const minutes = Math.max(0, Math.floor(Number(seconds) / 60));
  const age = minutes < 120 ? `${minutes} min` : minutes < 48 * 60 ? `${Math.floor(minutes / 60)} h` : `${Math.floor(minutes / 1440)} days`;
  return `newest point here is ${age} old`;
}
