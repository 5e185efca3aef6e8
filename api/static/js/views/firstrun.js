// The first-run wizard, right after the first administrator is created (auth.js), and at
// "#/first-run/<step>" later: the recovery key (shown once: confirming it makes the API answer 410
// from then on), the network and the time of the appliance OS (a note instead when the service
// runs from a checkout: the host's own tools manage those), and the first pool. Every step but the
// key can be skipped; the settings stay changeable later.

import { ApiError, api } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { bytes, dateTime } from "../format.js";
import { bannerSlot, busy, button, field, loading } from "../ui.js";
import { jobProgress, redundancyWords } from "./disks.js";

const STEPS = [
  ["recovery-key", "Recovery key"],
  ["network", "Network"],
  ["time", "Time"],
  ["pool", "First pool"],
];
const JOB_POLL_MS = 1000;
const KEY_PURPOSE =
  "Everything the appliance stores is encrypted. This key opens the store's copies (on its disks, tapes, USB disks or buckets) when the appliance itself is lost or its passphrase forgotten: without it, nobody can read them back, not even the vendor.";

function stepIndex(name) {
  const i = STEPS.findIndex(([id]) => id === name);
  return i < 0 ? 0 : i;
}

function progress(current) {
  return h(
    "ol",
    { class: "wizard-steps", "aria-label": "Set-up steps" },
    STEPS.map(([id, label], i) =>
      h(
        "li",
        { class: ["wizard-step", i < current ? "done" : null, i === current ? "current" : null], "aria-current": i === current ? "step" : null, dataset: { step: id } },
        h("span", { class: "wizard-step-n", "aria-hidden": "true" }, i < current ? icon("check") : String(i + 1)),
        h("span", { text: label }),
        i < current ? h("span", { class: "sr-only", text: " (done)" }) : null,
      ),
    ),
  );
}

function actions(...buttons) {
  return h("div", { class: "wizard-actions" }, buttons);
}

function hostNote(what) {
  return h("p", { class: "muted wizard-note", text: `The appliance runs from a checkout here: the host's own tools manage its ${what}.` });
}

// --- (a) the recovery key ------------------------------------------------------------------------

async function keyStep(ctx) {
  let key;
  try {
    key = await api.get("/api/system/recovery-key");
  } catch (err) {
    if (err.status !== 410) throw err;
    return [
      h("h2", { text: "Recovery key" }),
      h("div", { class: "banner banner-info key-gone", role: "status" }, icon("shield", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: "The recovery key is no longer shown here. " }), h("span", { text: `${err.message.charAt(0).toUpperCase()}${err.message.slice(1)}.` }))),
      actions(button("Continue", { kind: "primary", onClick: () => ctx.next() })),
    ];
  }
  const copied = h("span", { class: "muted copy-note", role: "status" });
  const copy = button("Copy", {
    iconName: "copy",
    onClick: async () => {
      try {
        await navigator.clipboard.writeText(key.recovery_key);
        copied.textContent = "Copied.";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(keyText);
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        copied.textContent = "Selected: press Ctrl+C to copy.";
      }
    },
  });
  const keyText = h("pre", { class: "recovery-key", "aria-label": "The store's recovery key", text: key.recovery_key });
  const kept = h("input", { type: "checkbox", name: "kept" });
  const next = button("Continue", { kind: "primary", disabled: true });
  kept.addEventListener("change", () => {
    next.disabled = !kept.checked;
  });
  next.addEventListener("click", () =>
    busy(next, ctx.banner, async () => {
      await api.post("/api/system/recovery-key/confirm");
      ctx.next();
    }),
  );
  return [
    h("h2", { text: "Your recovery key" }),
    h("p", { text: KEY_PURPOSE }),
    h(
      "div",
      { class: "key-card" },
      h("p", { class: "key-card-title", text: "Backup appliance recovery key" }),
      h("p", { class: "muted small", text: `Store ${key.store_id}` }),
      keyText,
      h("p", { class: "muted small key-card-use", text: "To use it: on a new appliance, Tape › Recover from tapes, or `appliance key recover` on its console." }),
    ),
    h("div", { class: "wizard-inline" }, button("Print", { iconName: "file", onClick: () => window.print() }), copy, copied),
    h("p", { class: "small warn-text", text: "It is shown only now. Print it or save it somewhere safe, apart from the appliance. Later only the appliance's console shows it again." }),
    h("label", { class: "fo-check wizard-confirm" }, kept, h("span", { text: "I printed or saved the recovery key somewhere safe" })),
    actions(next),
  ];
}

// --- (b) network -------------------------------------------------------------------------------

function lines(text) {
  return text
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

async function networkStep(ctx) {
  const title = h("h2", { text: "Network" });
  if (!ctx.system.appliance_os) return [title, hostNote("network"), actions(button("Continue", { kind: "primary", onClick: () => ctx.next() }))];
  const current = await api.get("/api/system/network");
  const radio = (value, label, help) =>
    h("label", { class: "fo-check" }, h("input", { type: "radio", name: "mode", value, checked: current.mode === value }), h("span", h("strong", { text: label }), h("span", { class: "muted small", text: ` ${help}` })));
  const staticPart = h(
    "div",
    { class: "wizard-static" },
    field({ label: "Address with prefix length", name: "address", value: current.address || "", placeholder: "192.168.1.20/24", autocomplete: "off", spellcheck: "false" }),
    field({ label: "Gateway", name: "gateway", value: current.gateway || "", placeholder: "192.168.1.1", autocomplete: "off", spellcheck: "false" }),
  );
  const form = h(
    "form",
    { class: "form", novalidate: true },
    h("fieldset", { class: "field" }, h("legend", { class: "label", text: "Address" }), radio("dhcp", "Automatic (DHCP)", "the network's DHCP server gives the address; recommended"), radio("static", "Static", "a fixed address you choose")),
    staticPart,
    field({ label: "DNS servers", name: "dns", value: current.dns.join(" "), placeholder: "192.168.1.1 9.9.9.9", help: "IP addresses, separated by spaces; empty: those DHCP gives (with a static address, none)." }),
    field({ label: "Interface", name: "interface", value: current.interface, help: "The network card (like enp3s0); * matches any ending." }),
  );
  const showStatic = () => {
    staticPart.hidden = form.elements.mode.value !== "static";
  };
  form.addEventListener("change", showStatic);
  showStatic();
  const save = button("Save and continue", { kind: "primary" });
  save.addEventListener("click", () =>
    busy(save, ctx.banner, async () => {
      const el = form.elements;
      const isStatic = el.mode.value === "static";
      const body = { mode: el.mode.value, interface: el.interface.value.trim() || null, dns: lines(el.dns.value) };
      if (isStatic) Object.assign(body, { address: el.address.value.trim() || null, gateway: el.gateway.value.trim() || null });
      const saved = await api.put("/api/system/network", body);
      ctx.next(saved.apply_errors);
    }),
  );
  return [
    title,
    h("p", { class: "muted", text: "How the appliance joins your network. A new address takes effect at once: the page then moves to it." }),
    form,
    actions(button("Keep as it is", { onClick: () => ctx.next() }), save),
  ];
}

// --- (c) time ------------------------------------------------------------------------------------

function zoneList() {
  try {
    return Intl.supportedValuesOf("timeZone");
  } catch {
    return [];
  }
}

async function timeStep(ctx) {
  const title = h("h2", { text: "Time zone and time servers" });
  if (!ctx.system.appliance_os) return [title, hostNote("clock and time zone"), actions(button("Continue", { kind: "primary", onClick: () => ctx.next() }))];
  const current = await api.get("/api/system/time");
  const browserZone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const zones = h("datalist", { id: "wizard-zones" }, ["UTC", ...zoneList()].map((z) => h("option", { value: z })));
  const zone = field({ label: "Time zone", name: "timezone", value: current.timezone === "UTC" && browserZone ? browserZone : current.timezone, list: "wizard-zones", autocomplete: "off", spellcheck: "false", help: "Schedules run in this zone, like Europe/Berlin." });
  const servers = field({ label: "Time servers", name: "ntp_servers", value: current.ntp_servers.join(" "), placeholder: "ntp.example.org", help: "Host names or addresses, separated by spaces; empty: Debian's public pool." });
  const ntp = h("input", { type: "checkbox", name: "ntp", checked: current.ntp });
  const form = h("form", { class: "form", novalidate: true }, zone, zones, h("label", { class: "fo-check" }, ntp, h("span", { text: "Set the clock from time servers (NTP)" })), servers);
  const save = button("Save and continue", { kind: "primary" });
  save.addEventListener("click", () =>
    busy(save, ctx.banner, async () => {
      const el = form.elements;
      const saved = await api.put("/api/system/time", { timezone: el.timezone.value.trim(), ntp: el.ntp.checked, ntp_servers: lines(el.ntp_servers.value) });
      ctx.next(saved.apply_errors);
    }),
  );
  return [
    title,
    h("p", { class: "muted", text: `The appliance's clock says ${dateTime(current.now)} (UTC ${current.now.slice(11, 16)}).` }),
    form,
    actions(button("Keep as it is", { onClick: () => ctx.next() }), save),
  ];
}

// --- (d) the first pool --------------------------------------------------------------------------

function diskLine(d) {
  return `${d.devnode} · ${bytes(d.size_bytes)} · ${[d.vendor, d.model].filter(Boolean).join(" ") || d.kind}`;
}

async function poolStep(ctx) {
  const title = h("h2", { text: "First pool" });
  const intro = h("p", { class: "muted", text: "A pool is a filesystem on disks of its own that holds the backups, so they survive the loss of the system disk. Two disks make a mirror. You can also do this later under Pools & disks." });
  const answer = await api.get("/api/disks");
  const eligible = answer.disks.filter((d) => d.eligible);
  const finish = button("Skip", { onClick: () => ctx.done() });
  if (!eligible.length) {
    return [title, intro, h("p", { class: "wizard-note", text: "No disk may join a pool now (Pools & disks › Disks says why for each); the backups go to the data directory until a pool exists." }), actions(button("Finish", { kind: "primary", onClick: () => ctx.done() }))];
  }
  const suggested = new Set(ctx.system.first_pool_disks);
  const boxes = eligible.map((d) => h("input", { type: "checkbox", name: "disks", value: d.identity, checked: suggested.has(d.identity), "aria-label": `Disk ${diskLine(d)}` }));
  const words = h("p", { class: "help", id: "wizard-pool-words" });
  const chosen = () => eligible.filter((_, i) => boxes[i].checked);
  const layout = () => (chosen().length >= 2 ? "btrfs:raid1" : "ext4:single");
  const refresh = () => {
    words.textContent = redundancyWords(layout(), chosen());
  };
  boxes.forEach((b) => b.addEventListener("change", refresh));
  refresh();
  const erase = h("input", { type: "checkbox", name: "erase" });
  const form = h(
    "form",
    { class: "form", novalidate: true },
    field({ label: "Pool name", name: "name", value: "data", help: "Lower-case letters, digits and dashes; not “default”." }),
    h(
      "fieldset",
      { class: "field" },
      h("legend", { class: "label", text: "Disks" }),
      suggested.size ? h("p", { class: "muted small", text: "The installer suggested the ticked disks." }) : null,
      h("div", { class: "disk-choices" }, eligible.map((d, i) => h("label", { class: "fo-check" }, boxes[i], h("span", h("strong", { text: d.devnode }), ` ${diskLine(d).split(" · ").slice(1).join(" · ")}`, h("span", { class: "muted small mono", text: ` ${d.identity}` }))))),
      words,
    ),
    h("label", { class: "fo-check" }, erase, h("span", { text: "I understand that everything on the chosen disks is erased" })),
  );
  const status = h("div", { class: "wizard-job", "aria-live": "polite" });
  const create = button("Create pool", { kind: "danger" });
  create.addEventListener("click", () =>
    busy(create, ctx.banner, async () => {
      const picks = chosen();
      if (!picks.length) throw new ApiError(400, "invalid_input", "choose at least one disk", { field: "disks" });
      if (!erase.checked) throw new ApiError(400, "invalid_input", "tick the box to confirm that the chosen disks may be erased", { field: "erase" });
      const [fsType, profile] = layout().split(":");
      const job = await api.post("/api/pools", { name: form.elements.name.value.trim(), disks: picks.map((d) => d.identity), fs_type: fsType, profile });
      create.hidden = true;
      finish.hidden = true;
      await followJob(ctx, job, status);
    }),
  );
  return [title, intro, form, status, actions(finish, create)];
}

async function followJob(ctx, job, status) {
  for (;;) {
    replace(status, h("p", { text: "Creating the pool…" }), jobProgress(job));
    if (["succeeded", "failed", "cancelled", "interrupted"].includes(job.state)) break;
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
    if (ctx.stopped()) return;
    job = await api.get(`/api/jobs/${encodeURIComponent(job.id)}`);
  }
  const ok = job.state === "succeeded";
  replace(
    status,
    jobProgress(job),
    ok ? h("p", { class: "wizard-ok", text: "The pool is ready: new backups go there." }) : h("p", { class: "error-text", text: "The pool was not created; Pools & disks can try again." }),
    actions(button("Finish", { kind: "primary", onClick: () => ctx.done() })),
  );
}

// --- the wizard --------------------------------------------------------------------------------------

const RENDER = { "recovery-key": keyStep, network: networkStep, time: timeStep, pool: poolStep };

/**
 * Draw the wizard into `box` from step `start`. onDone: called after the last step (or its Skip).
 * Returns a function that stops it (a screen left while a job is followed).
 */
export function startWizard(box, { start = "recovery-key", onDone }) {
  const banner = bannerSlot();
  let stopped = false;
  let index = stepIndex(start);
  const ctx = {
    banner,
    system: null,
    stopped: () => stopped,
    done: () => {
      stopped = true;
      onDone();
    },
    next: (applyErrors = []) => {
      if (applyErrors && applyErrors.length) {
        // saved in the OS files; the running system did not take it in at once
        banner.show("warning", "Saved, but not applied everywhere yet", `${applyErrors.join("; ")}. It takes effect at the next restart.`);
      }
      index += 1;
      if (index >= STEPS.length) ctx.done();
      else draw(applyErrors && applyErrors.length);
    },
  };
  const body = h("div", { class: "wizard-body" });
  const head = h("div");
  replace(box, h("div", { class: "wizard" }, head, banner.el, body));
  async function draw(keepBanner = false) {
    if (!keepBanner) banner.hide();
    replace(head, progress(index));
    replace(body, loading());
    try {
      if (!ctx.system) ctx.system = await api.get("/api/system");
      const parts = await RENDER[STEPS[index][0]](ctx);
      if (!stopped) replace(body, h("section", { class: "wizard-panel", dataset: { step: STEPS[index][0] } }, parts));
      const first = body.querySelector("h2");
      if (first) {
        first.tabIndex = -1;
        first.focus();
      }
    } catch (err) {
      banner.error(err);
      replace(body, actions(button("Try again", { onClick: () => draw() }), button("Skip this step", { onClick: () => ctx.next() })));
    }
  }
  draw();
  return () => {
    stopped = true;
  };
}

/** The wizard as a whole page, before the app's layout exists (right after "Create administrator"). */
export function renderWizardPage(root, { onDone }) {
  const box = h("div", { class: "auth-card wizard-card" });
  replace(root, h("div", { class: "auth" }, box));
  document.title = "Set up · Backup appliance";
  return startWizard(box, { start: "recovery-key", onDone });
}

/** "#/first-run" and "#/first-run/<step>" inside the app (main.js routes them here). */
export default async function firstRunView(view) {
  const box = h("div", { class: "card wizard-card" });
  replace(view.el, h("div", { class: "page-head" }, h("div", { class: "page-title" }, h("h1", { text: "Set up the appliance" }))), box);
  const stop = startWizard(box, { start: view.params[0] || "recovery-key", onDone: () => view.navigate("#/") });
  view.onDispose(stop);
}

/** A dismissible notice for the dashboard while nobody has confirmed keeping the recovery key
 * (administrators only; null otherwise). */
export async function recoveryKeyReminder(session) {
  if (!session || session.role !== "admin") return null;
  let system;
  try {
    system = await api.get("/api/system");
  } catch {
    return null;
  }
  if (system.recovery_key_confirmed) return null;
  const el = h(
    "div",
    { class: "banner banner-warning key-reminder", role: "status" },
    icon("alert", "banner-icon"),
    h("div", { class: "banner-body" }, h("strong", { text: "The recovery key is not saved yet. " }), "Without it the backups cannot be read back if this appliance is lost. ", h("a", { href: "#/first-run/recovery-key", text: "Show and save it" })),
    h("button", { type: "button", class: "icon-btn banner-close", "aria-label": "Dismiss", onClick: () => el.remove() }, icon("close")),
  );
  return el;
}
