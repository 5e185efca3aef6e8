// Schedules picked in words ("Every day at 22:00") and the cron expression they stand for.
//
// The appliance stores five-field cron expressions (minute hour day month weekday, read in the
// appliance's time zone; see appliance/schedule.py). A person picks a kind of repeat, a time and
// a day; the cron form is the advanced choice, for anything the words cannot say. choiceOf()
// reads an expression back into words when it is one the words can say, so editing a policy
// shows what was picked, not the expression.

import { h } from "../dom.js";
import { describeCron } from "../format.js";
import { field, select } from "../ui.js";

export const DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

export const REPEATS = [
  ["hourly", "Every hour"],
  ["hours", "Every few hours"],
  ["daily", "Every day at"],
  ["weekdays", "Every weekday at"],
  ["weekly", "Every week on"],
  ["monthly", "Every month, on the 1st at"],
  ["cron", "Advanced: a cron expression"],
];
const STEPS = ["2", "3", "4", "6", "8", "12"];

/** The cron expression of a choice {repeat, time: "HH:MM", day: 0-6, step: hours}. */
export function cronOf(choice) {
  const [hour, minute] = String(choice.time || "00:00").split(":").map((v) => Number(v) || 0);
  switch (choice.repeat) {
    case "hourly":
      return "0 * * * *";
    case "hours":
      return `0 */${choice.step || 6} * * *`;
    case "daily":
      return `${minute} ${hour} * * *`;
    case "weekdays":
      return `${minute} ${hour} * * 1-5`;
    case "weekly":
      return `${minute} ${hour} * * ${Number(choice.day) || 0}`;
    case "monthly":
      return `${minute} ${hour} 1 * *`;
    default:
      return String(choice.cron || "").trim();
  }
}

const pad = (v) => String(v).padStart(2, "0");

/** The choice an expression is, or {repeat: "cron"} when the words cannot say it. */
export function choiceOf(expr) {
  const text = String(expr || "").trim();
  const parts = text.split(/\s+/);
  const custom = { repeat: "cron", cron: text, time: "22:00", day: 0, step: "6" };
  if (parts.length !== 5) return custom;
  const [min, hour, dom, mon, dow] = parts;
  const num = (v) => /^\d+$/.test(v);
  if (mon !== "*") return custom;
  if (text === "0 * * * *") return { ...custom, repeat: "hourly", cron: text };
  const step = /^\*\/(\d+)$/.exec(hour);
  if (min === "0" && step && STEPS.includes(step[1]) && dom === "*" && dow === "*") return { ...custom, repeat: "hours", step: step[1], cron: text };
  if (!num(min) || !num(hour) || Number(min) > 59 || Number(hour) > 23) return custom;
  const time = `${pad(hour)}:${pad(min)}`;
  if (dom === "*" && dow === "*") return { ...custom, repeat: "daily", time, cron: text };
  if (dom === "*" && dow === "1-5") return { ...custom, repeat: "weekdays", time, cron: text };
  if (dom === "*" && num(dow) && Number(dow) <= 7) return { ...custom, repeat: "weekly", time, day: Number(dow) % 7, cron: text };
  if (dom === "1" && dow === "*") return { ...custom, repeat: "monthly", time, cron: text };
  return custom;
}

/**
 * The controls of one schedule in words: a repeat, a time, a day, hours, and the cron field
 * (advanced). Only the controls the repeat uses are enabled (and shown); the cron field shows
 * the expression the words make and takes one when "Advanced" is picked.
 * Returns {el, cron(): the expression, onChange(fn)}.
 */
export function scheduleControls(expr, { label = "When" } = {}) {
  const start = choiceOf(expr);
  const repeat = select("repeat", REPEATS, start.repeat, { "aria-label": label });
  const time = h("input", { type: "time", name: "time", value: start.time, "aria-label": "At", required: true, step: 60 });
  const day = select("day", DAYS.map((d, i) => [String(i), `${d} at`]), String(start.day), { "aria-label": "Day of the week" });
  const step = select("step", STEPS.map((n) => [n, `${n} hours`]), start.step, { "aria-label": "How many hours apart" });
  const cron = h("input", { type: "text", name: "cron", value: start.cron, class: "mono cron-input", "aria-label": "Cron expression", spellcheck: "false", required: true });
  const words = h("p", { class: "help schedule-words" });
  const listeners = [];
  const uses = {
    time: ["daily", "weekdays", "weekly", "monthly"],
    day: ["weekly"],
    step: ["hours"],
  };
  const sync = () => {
    const kind = repeat.value;
    for (const [name, control] of [["time", time], ["day", day], ["step", step]]) {
      const used = uses[name].includes(kind);
      control.disabled = !used;
      control.hidden = !used;
    }
    cron.disabled = kind !== "cron";
    if (kind !== "cron") cron.value = cronOf({ repeat: kind, time: time.value, day: day.value, step: step.value });
    words.textContent = describeCron(cron.value);
    for (const fn of listeners) fn();
  };
  for (const control of [repeat, time, day, step, cron]) control.addEventListener(control === cron ? "input" : "change", sync);
  sync();
  const el = h("div", { class: "schedule-words-row" }, h("div", { class: "input-row" }, repeat, day, step, time), field({ label: "Cron expression (advanced)", control: cron, className: "cron-field" }), words);
  return {
    el,
    cron: () => cron.value.trim(),
    onChange: (fn) => listeners.push(fn),
  };
}
