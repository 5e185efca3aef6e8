// Protection status in words, shared by the dashboard and the weekly report: each state's name
// and tone, and the 3-2-1 legs as a row of ticks and crosses (GET /api/dashboard's "legs").

import { h } from "../dom.js";
import { count } from "../format.js";
import { pill } from "../ui.js";

export const STATE_WORDS = {
  running_from_backup: ["Running from backup", "info"],
  at_risk: ["At risk", "bad"],
  needs_attention: ["Needs attention", "warn"],
  protected: ["Protected", "good"],
};

export function statePill(state) {
  const [words, tone] = STATE_WORDS[state] || [state, "neutral"];
  return pill(words, tone);
}

const MEDIA_WORDS = {
  system_disk: "system disk",
  appliance_disk: "data disks",
  removable_disk: "removable disk",
  tape: "tape",
  cloud: "cloud bucket",
  other_appliance: "another appliance",
};

/** The four legs, each met or not: 2 copies, 2 kinds of media, 1 off site, 1 offline or immutable. */
export function legsList(legs) {
  const media = legs.media.map((m) => MEDIA_WORDS[m] || m);
  const items = [
    [legs.enough_copies, "Two copies", count(legs.copies, "copy", "copies")],
    [legs.two_media && !legs.system_disk_only, "Two kinds of media", media.length ? media.join(", ") : "none"],
    [legs.offsite, "One off site", legs.offsite ? "yes" : "none"],
    [legs.offline_or_immutable, "One offline or immutable", legs.immutable ? "immutable" : legs.offline ? "offline" : "none"],
  ];
  return h(
    "ul",
    { class: "legs", "aria-label": "3-2-1 rule" },
    items.map(([met, label, detail]) =>
      h("li", { class: met ? "leg leg-met" : "leg leg-missing", dataset: { met: met ? "yes" : "no" }, title: `${label}: ${detail}` }, h("span", { class: "leg-mark", "aria-hidden": "true", text: met ? "✓" : "✗" }), h("span", { text: label }), h("span", { class: "sr-only", text: met ? " (met)" : " (missing)" })),
    ),
  );
}
