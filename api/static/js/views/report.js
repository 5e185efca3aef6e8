// The weekly protection report (GET /api/protection/report): per asset its state and reasons,
// copies and 3-2-1 legs, the worst RPO and the RTOs of the week, what the backups added and the
// jobs that failed. Made to be printed (or saved as PDF from the print dialog): the print rules
// in app.css hide the menu and keep each asset on one page where it fits.

import { api } from "../api.js";
import { h, replace } from "../dom.js";
import { LOCATION_NAMES, bytes, count, dateTime, day, duration, period } from "../format.js";
import { button, card, loading, pageHeader } from "../ui.js";
import { legsList, statePill } from "./protection_words.js";

function rpoLine(a) {
  const target = a.rpo_seconds ? `target ${period(a.rpo_seconds)}` : "no target set";
  if (a.worst_age_seconds === null) return `No good backup all week (${target}).`;
  const missed = a.rpo_seconds && a.worst_age_seconds > a.rpo_seconds;
  return `The newest good backup was at most ${duration(a.worst_age_seconds)} old (${target}${a.rpo_seconds ? (missed ? ", missed" : ", met") : ""}).`;
}

function rtoLine(a) {
  if (a.kind !== "vm") return null;
  if (!a.rto_seconds.length) return "No proven boot this week.";
  const fastest = Math.min(...a.rto_seconds);
  const slowest = Math.max(...a.rto_seconds);
  return `${count(a.rto_seconds.length, "proven boot")}: recovery took ${fastest === slowest ? duration(fastest) : `${duration(fastest)} to ${duration(slowest)}`}.`;
}

function failedJobs(jobs) {
  if (!jobs.length) return h("p", { class: "muted", text: "No failed jobs." });
  return h(
    "ul",
    { class: "report-jobs" },
    jobs.map((j) => h("li", h("a", { href: `#/jobs/${j.id}`, text: `${dateTime(j.at)}: ${j.description}` }), j.error ? h("span", { class: "error-text", text: ` — ${j.error}` }) : null)),
  );
}

function assetSection(a) {
  return h(
    "section",
    { class: "report-asset", dataset: { asset: a.asset, state: a.state } },
    h("div", { class: "report-asset-head" }, h("h2", { text: a.asset }), statePill(a.state), h("span", { class: "muted", text: `${a.kind === "vm" ? "Virtual machine" : "Folder"} · ${a.policies.length ? a.policies.join(", ") : "no policy"}` })),
    a.reasons.length ? h("ul", { class: "reasons" }, a.reasons.map((r) => h("li", { class: `reason reason-${r.severity}` }, h("span", { class: "reason-text", text: r.message })))) : h("p", { text: "Every rule passes." }),
    h("p", { text: rpoLine(a) }),
    rtoLine(a) ? h("p", { text: rtoLine(a) }) : null,
    h("p", { text: `${count(a.points_made, "backup")} this week, adding ${bytes(a.bytes_added)}.` }),
    h("h3", { text: "Copies of the newest backup" }),
    legsList(a.legs),
    a.copies.length
      ? h("ul", { class: "report-copies" }, a.copies.map((c) => h("li", { text: `${LOCATION_NAMES[c.location_kind] || c.location_kind}: ${c.location}${c.state !== "present" ? ` (${c.state})` : ""}` })))
      : h("p", { class: "muted", text: "No copies." }),
    h("h3", { text: "Failed jobs" }),
    failedJobs(a.failed_jobs),
  );
}

export default async function report(view) {
  const body = h("div", loading());
  const print = button("Print", { kind: "primary", onClick: () => window.print() });
  const back = button("Dashboard", { kind: "ghost", href: "#/" });
  replace(view.el, pageHeader("Weekly protection report", "What was protected this week, what was not and why.", back, print), body);
  let r;
  try {
    r = await api.get("/api/protection/report?days=7");
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  const s = r.summary;
  const headline = !s.assets
    ? "Nothing is protected yet."
    : s.all_protected
      ? `All ${count(s.assets, "asset")} protected: every rule passes.`
      : `${s.assets - s.protected} of ${count(s.assets, "asset")} ${s.assets - s.protected === 1 ? "is" : "are"} not fully protected.`;
  replace(
    body,
    h(
      "div",
      { class: "report" },
      h("p", { class: "report-meta", text: `Protection report of ${r.appliance_name} · ${day(r.since)} to ${day(r.generated_at)} · made ${dateTime(r.generated_at)}` }),
      h("p", { class: "report-headline", text: headline }),
      r.assets.map(assetSection),
      r.other_failed_jobs.length ? card("Other failed jobs", {}, failedJobs(r.other_failed_jobs)) : null,
    ),
  );
}
