// Settings (administrators): the appliance's name and schedule settings, where restores may go,
// store maintenance, and the store's recovery key.

import { api } from "../api.js";
import { h, replace } from "../dom.js";
import { bytes, dateTime, describeCron, duration } from "../format.js";
import { bannerSlot, button, busy, card, confirmDialog, field, loading, markField, pageHeader, pill, select, setApplies, toast } from "../ui.js";
import { scheduleControls } from "./schedule_words.js";
import { systemCard } from "./system_updates.js";

const TIME_UNITS = [
  ["60", "minutes"],
  ["3600", "hours"],
  ["86400", "days"],
];
const SIZE_UNITS = [
  [String(1e6), "MB"],
  [String(1e9), "GB"],
  [String(1e12), "TB"],
];

/** The largest unit of `units` that says `value` in whole numbers (else the smallest). */
function inUnits(value, units) {
  for (const [unit] of [...units].reverse()) if (value && value % Number(unit) === 0) return [value / Number(unit), unit];
  return [value ? +(value / Number(units[0][0])).toFixed(3) : value, units[0][0]];
}

/** A number with its unit: {el, value()} (value in the base unit; null when left empty). */
function amountField({ label, name, value, units, help, emptyMeans = null }) {
  const [amount, unit] = value === null || value === undefined ? ["", units[Math.min(1, units.length - 1)][0]] : inUnits(value, units);
  const input = h("input", { type: "number", name, min: 0, step: "any", value: amount, id: `${name}-amount`, placeholder: emptyMeans || "" });
  const unitSelect = select(`${name}_unit`, units, unit, { "aria-label": `${label}: unit` });
  return {
    el: h("div", { class: "field" }, h("label", { class: "label", for: input.id, text: label }), h("div", { class: "input-row" }, input, unitSelect), help ? h("p", { class: "help", text: help }) : null),
    value: () => (input.value.trim() === "" ? null : Math.round(Number(input.value) * Number(unitSelect.value))),
  };
}

function settingsForm(current, view) {
  const banner = bannerSlot();
  const grace = amountField({ label: "Garbage collection grace", name: "gc_grace", value: current.gc_grace_seconds, units: TIME_UNITS, help: `Unreferenced data younger than this is kept (now ${duration(current.gc_grace_seconds)}).` });
  const budget = amountField({
    label: "Verification budget per run",
    name: "verify_budget",
    value: current.verify_max_bytes,
    units: SIZE_UNITS,
    emptyMeans: "everything",
    help: current.verify_max_bytes ? `Each store verification reads at most ${bytes(current.verify_max_bytes)}; coverage carries over, so nightly runs cover the whole store in turn.` : "Empty: each store verification reads the whole store.",
  });
  const form = h(
    "form",
    { class: "settings-form", novalidate: true },
    banner.el,
    h(
      "div",
      { class: "grid-2" },
      field({ label: "Appliance name", name: "appliance_name", value: current.appliance_name, required: true, help: "Shown in the header and the browser tab." }),
      field({ label: "Time zone of the schedules", name: "timezone", value: current.timezone, required: true, help: "An IANA name such as Europe/Berlin or UTC." }),
      field({
        label: "Scheduled backups",
        control: select("scheduler_paused", [["false", "Run as scheduled"], ["true", "Paused (only manual backups run)"]], String(current.scheduler_paused)),
      }),
      grace.el,
      budget.el,
    ),
    h("div", { class: "form-foot" }, h("button", { type: "submit", class: "btn btn-primary", text: "Save settings" })),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    const body = {
      appliance_name: form.elements.appliance_name.value.trim(),
      timezone: form.elements.timezone.value.trim(),
      scheduler_paused: form.elements.scheduler_paused.value === "true",
      gc_grace_seconds: Math.max(0, grace.value() || 0),
      verify_max_bytes: budget.value() || null,
    };
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      await api.put("/api/settings", body);
      toast("Settings saved.");
      document.querySelector(".appliance-name").textContent = body.appliance_name;
    } catch (err) {
      markField(form, banner.error(err).field);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function maintenanceCard(view) {
  const run = (path, what) => async (e) => {
    const job = await busy(e.currentTarget, view.banner, () => api.post(path, {}));
    if (job) toast(`${what} started.`, { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
  };
  const item = (title, text, action) => h("div", { class: "maint" }, h("div", h("strong", { text: title }), h("p", { class: "muted small", text })), action);
  return card(
    "Store maintenance",
    { subtitle: "Each runs as a job; the appliance stays usable meanwhile." },
    h(
      "div",
      { class: "maint-list" },
      item("Verify the store", "Re-read stored data and check it against its checksums; damaged points are marked.", button("Verify now", { iconName: "check", onClick: run("/api/verify", "Store verification") })),
      item(
        "Free unused space",
        "Garbage collection removes data no recovery point uses any more (after pruning or deleting points).",
        button("Collect garbage", { iconName: "trash", onClick: run("/api/gc", "Garbage collection") }),
      ),
      item(
        "Rebuild the catalog",
        "Recreate the list of recovery points from the store itself, e.g. after restoring the appliance's disk.",
        button("Rebuild…", {
          iconName: "refresh",
          onClick: () =>
            confirmDialog({
              title: "Rebuild the catalog?",
              text: "Backups, restores and maintenance wait until the rebuild is done. Recovery points are read back from the store.",
              confirmLabel: "Rebuild catalog",
              danger: false,
              action: async () => {
                const job = await api.post("/api/catalog/rebuild", {});
                toast("Catalog rebuild started.", { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
              },
            }),
        }),
      ),
    ),
  );
}

/** When the store verifies a slice of itself (the nightly slice), editable by an admin. */
function verifyScheduleCard(current, isAdmin) {
  const banner = bannerSlot();
  const when = scheduleControls(current.cron || "0 2 * * *", { label: "When the store is verified" });
  const on = select("verify_on", [["on", "On a schedule"], ["off", "Never by itself (only “Verify now”)"]], current.cron ? "on" : "off", { "aria-label": "Verify the store by itself" });
  const state = h("p", { class: "help verify-state", role: "status" });
  const showState = (s) => {
    const slice = s.max_bytes ? `reads at most ${bytes(s.max_bytes)} each time, oldest-checked data first` : "reads the whole store each time";
    state.textContent = s.cron ? `${describeCron(s.cron)} (${s.timezone}); ${slice}. Next: ${dateTime(s.next_at)}.` : "The store is verified only when someone presses “Verify now”.";
  };
  showState(current);
  const whenBox = h("div", { class: "verify-when" }, when.el);
  const apply = () => setApplies(whenBox, on.value === "on" && isAdmin);
  on.addEventListener("change", apply);
  apply();
  on.disabled = !isAdmin;
  const form = h(
    "form",
    { class: "settings-form", novalidate: true },
    banner.el,
    field({ label: "Verify the store by itself", control: on }),
    whenBox,
    state,
    isAdmin ? h("div", { class: "form-foot" }, h("button", { type: "submit", class: "btn btn-primary", text: "Save verify schedule" })) : null,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const saved = await api.put("/api/settings/verify", { cron: on.value === "on" ? when.cron() : null });
      showState(saved);
      toast("Verify schedule saved.");
    } catch (err) {
      markField(form, banner.error(err).field);
    } finally {
      submit.disabled = false;
    }
  });
  return card("Verify schedule", { subtitle: "A verification re-reads stored data and checks it. On a schedule, each run checks a slice (the budget above), so the whole store is checked in turn." }, form);
}

function lines(text) {
  return text
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
}

/** Restore areas and devices: the only places besides downloads and an asset's own source that a
 * restore may write to (the appliance runs as root). */
function restoreCard(current) {
  const banner = bannerSlot();
  const extra = current.areas.filter((a) => a !== current.default_area);
  const states = h("ul", { class: "plain small" });
  const showStates = (devices) =>
    replace(
      states,
      devices.map((d) => h("li", h("span", { class: "mono", text: d.path }), " ", d.unavailable ? pill(`Unavailable: ${d.unavailable}`, "warn") : pill(d.block_device ? `Block device${d.size ? `, ${bytes(d.size)}` : ""}` : "Image file", "good"))),
    );
  showStates(current.devices);
  const form = h(
    "form",
    { class: "settings-form", novalidate: true },
    banner.el,
    h(
      "div",
      { class: "grid-2" },
      field({
        label: "Restore areas (one folder per line)",
        control: h("textarea", { name: "areas", rows: 4, text: extra.join("\n") }),
        help: `Restores into the appliance go to a folder inside one of these, and always may go to ${current.default_area}. Not /, a system folder or the data directory.`,
      }),
      field({
        label: "Restore devices (one per line)",
        control: h("textarea", { name: "devices", rows: 4, text: current.devices.map((d) => d.path).join("\n") }),
        help: "Block devices or image files a VM point may be restored onto. A device that is mounted, the system disk or a pool's is refused.",
      }),
    ),
    states,
    h("div", { class: "form-foot" }, h("button", { type: "submit", class: "btn btn-primary", text: "Save restore targets" })),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const saved = await api.put("/api/settings/restore", { areas: lines(form.elements.areas.value), devices: lines(form.elements.devices.value) });
      showStates(saved.devices);
      toast("Restore targets saved.");
    } catch (err) {
      markField(form, banner.error(err).field);
    } finally {
      submit.disabled = false;
    }
  });
  return card("Where restores may go", { subtitle: "The service runs as root: a restore writes only into these places, to a download, or back over an asset's own source after a confirmation." }, form);
}

function recoveryKeyCard(view) {
  const box = h("div", { class: "key-box" });
  const show = button("Show the recovery key", {
    iconName: "key",
    onClick: async (e) => {
      const key = await busy(e.currentTarget, view.banner, () => api.get("/api/recovery-key"));
      if (!key) return;
      replace(
        box,
        h("p", { class: "muted small", text: `Store ${key.store_id}` }),
        h("pre", { class: "recovery-key", "aria-label": "The store's recovery key", text: key.recovery_key }),
        h("div", { class: "card-actions" }, button("Print", { iconName: "file", onClick: () => window.print() }), button("Hide", { kind: "ghost", onClick: () => replace(box, show) })),
      );
    },
  });
  box.appendChild(show);
  return card(
    "Recovery key",
    { subtitle: "With this key and the store's disks, the data can be read back even if this appliance is lost. Print it and keep it apart from the appliance. Viewing it is recorded in the audit log." },
    box,
  );
}

export default async function settingsView(view) {
  const body = h("div", loading());
  replace(view.el, pageHeader("Settings", "The appliance's name, schedules, where restores may go, maintenance and recovery key."), body);
  let current;
  let restore = null;
  let verify = null;
  try {
    current = await api.get("/api/settings");
    verify = await api.get("/api/settings/verify");
    if (view.session.role === "admin") restore = await api.get("/api/settings/restore");
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  replace(body, card("General", {}, settingsForm(current, view)), verifyScheduleCard(verify, view.session.role === "admin"), restore ? restoreCard(restore) : null, maintenanceCard(view), recoveryKeyCard(view), systemCard(view));
}
