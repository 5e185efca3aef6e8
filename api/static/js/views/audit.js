// The audit log: every change, sign-in, restore and download. Administrators only.

import { api, q } from "../api.js";
import { h, replace } from "../dom.js";
import { auditAction, dateTime } from "../format.js";
import { button, card, emptyState, loading, pageHeader, table } from "../ui.js";
import { auditDetails, auditSentence } from "./audit_words.js";

export default async function auditView(view) {
  let limit = 200;
  const search = h("input", { type: "search", id: "audit-filter", placeholder: "Filter by user, action or target", "aria-label": "Filter the audit log" });
  const body = h("div", loading());
  replace(view.el, pageHeader("Audit log", "Every change, sign-in, restore and download, newest first."), h("div", { class: "toolbar" }, search), body);
  let entries = [];

  function draw() {
    const needle = search.value.trim().toLowerCase();
    const shown = needle ? entries.filter((e) => `${e.actor} ${e.action} ${auditAction(e.action)} ${auditSentence(e)}`.toLowerCase().includes(needle)) : entries;
    replace(
      body,
      card(
        null,
        {},
        shown.length
          ? table(
              [
                { label: "When", cell: (e) => h("span", { class: "nowrap", text: dateTime(e.at) }) },
                { label: "Who", cell: (e) => h("strong", { text: e.actor }) },
                { label: "What", cell: (e) => h("div", { class: "stack audit-what" }, h("span", { class: "break", text: auditSentence(e) }), h("span", { class: "muted small", text: auditDetails(e) })) },
              ],
              shown,
              { caption: "Audit log" },
            )
          : emptyState("audit", needle ? "Nothing matches the filter" : "The audit log is empty", needle ? "Try another word." : null),
        entries.length >= limit && limit < 10000
          ? h(
              "div",
              { class: "more" },
              button("Show older entries", {
                onClick: () => {
                  limit = Math.min(10000, limit * 5);
                  load();
                },
              }),
            )
          : null,
      ),
    );
  }

  async function load() {
    try {
      entries = await api.get(q("/api/audit", { limit }));
    } catch (err) {
      view.banner.error(err);
      replace(body);
      return;
    }
    draw();
  }
  search.addEventListener("input", draw);
  await load();
}
