// Settings (administrators): the appliance's name and schedule settings, store maintenance, and
// the store's recovery key.

import { api } from "../api.js";
import { h, replace } from "../dom.js";
import { bytes, duration } from "../format.js";
import { bannerSlot, button, busy, card, confirmDialog, field, loading, markField, pageHeader, select, toast } from "../ui.js";

function settingsForm(current, view) {
  const banner = bannerSlot();
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
      field({ label: "Garbage collection grace (seconds)", name: "gc_grace_seconds", type: "number", min: 0, value: current.gc_grace_seconds, help: `Unreferenced data younger than this is kept (now ${duration(current.gc_grace_seconds)}).` }),
      field({
        label: "Verification budget per run (bytes, empty: everything)",
        name: "verify_max_bytes",
        type: "number",
        min: 1,
        value: current.verify_max_bytes ?? "",
        help: current.verify_max_bytes ? `Each store verification reads at most ${bytes(current.verify_max_bytes)}; coverage carries over.` : "Each store verification reads the whole store.",
      }),
    ),
    h("div", { class: "form-foot" }, h("button", { type: "submit", class: "btn btn-primary", text: "Save settings" })),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    const budget = form.elements.verify_max_bytes.value.trim();
    const body = {
      appliance_name: form.elements.appliance_name.value.trim(),
      timezone: form.elements.timezone.value.trim(),
      scheduler_paused: form.elements.scheduler_paused.value === "true",
      gc_grace_seconds: Math.max(0, parseInt(form.elements.gc_grace_seconds.value || "0", 10) || 0),
      verify_max_bytes: budget ? Number(budget) : null,
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
  replace(view.el, pageHeader("Settings", "The appliance's name, schedules, maintenance and recovery key."), body);
  let current;
  try {
    current = await api.get("/api/settings");
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  replace(body, card("General", {}, settingsForm(current, view)), maintenanceCard(view), recoveryKeyCard(view));
}
