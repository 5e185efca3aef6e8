// Tiering: the rules that move aged recovery points to cold, immutable buckets, when runs start
// and how fast they upload, and the plan a run would carry out now with its estimated cost.
//
// Everything comes from one document, GET /api/tiering ({settings, plan}). A change (a rule
// added, edited or removed; the schedule) PUTs the whole settings document: the appliance
// validates it (tiering/rules.py) and answers the settings with the plan they make, which
// replaces the preview. A refused change keeps the screen as it was and shows the appliance's
// words where the change was made. Roles: administrators change the rules, operators start a
// run, viewers read.

import { api, enc } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { bytes, capitalise, count, dateTime, describeCron, shortId } from "../format.js";
import { bannerSlot, busy, button, card, confirmDialog, emptyState, field, formDialog, loading, markField, pageHeader, pill, select, table, toast } from "../ui.js";

// The values tiering/rules.py accepts (PERIOD_CLASSES, RULE_STORAGE_CLASSES).
const PERIODS = [
  ["daily", "Daily", "the newest point of each day"],
  ["weekly", "Weekly", "of each ISO week"],
  ["monthly", "Monthly", "of each month"],
  ["yearly", "Yearly", "of each year"],
];
const STORAGE_CLASSES = [
  ["GLACIER", "GLACIER (archive: a restore first recalls, minutes to hours)"],
  ["DEEP_ARCHIVE", "DEEP_ARCHIVE (cheapest: a recall takes 12-48 hours)"],
  ["GLACIER_IR", "GLACIER_IR (archive, readable at once)"],
  ["STANDARD_IA", "STANDARD_IA (infrequent access)"],
  ["STANDARD", "STANDARD"],
];
// A copy uploads one object per data pack of up to 16 MiB (tiering.pricing.requests_for).
const PACK_BYTES = 16 * 1024 * 1024;

/** An amount of money: "$0.02"; a charge under a cent is "under $0.01", never "$0.00". */
export function money(amount, currency = "USD") {
  const value = Number(amount);
  if (amount === null || amount === undefined || !Number.isFinite(value)) return "—";
  let format;
  try {
    format = new Intl.NumberFormat("en-US", { style: "currency", currency, minimumFractionDigits: 2, maximumFractionDigits: 2 });
  } catch {
    format = { format: (n) => `${n.toFixed(2)} ${currency}` };
  }
  if (value > 0 && value < 0.01) return `under ${format.format(0.01)}`;
  return format.format(value);
}

function sentence(text) {
  const t = capitalise(String(text || "").trim());
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

function days(n) {
  return count(n, "day");
}

function numberOrNull(input) {
  const text = String(input.value || "").trim();
  return text === "" ? null : Number(text);
}

// --- the rules -------------------------------------------------------------------------------------

/** Which points a rule takes, in words: "Monthly points of docs, at least 30 days old". */
function whichPoints(rule) {
  const classes = rule.classes || [];
  const assets = rule.assets || [];
  const what = classes.length ? `${classes.map(capitalise).join(", ")} points` : "Every complete point";
  const of = assets.length ? ` of ${assets.join(", ")}` : " of every asset";
  const age = rule.min_age_days ? `, at least ${days(rule.min_age_days)} old` : "";
  return `${what}${of}${age}`;
}

/** How long a copy is kept and whether the bucket locks it. */
function keptText(rule, location) {
  if (rule.keep_days === null || rule.keep_days === undefined) return "No date: kept until removed";
  const lock = location && location.immutable ? `, locked (${location.lock_mode || "Object Lock"})` : "";
  return `${days(rule.keep_days)} after the point was made${lock}`;
}

function localText(rule) {
  if (rule.keep_local_days === null || rule.keep_local_days === undefined) return "Kept";
  return `Dropped ${days(rule.keep_local_days)} after the copy is verified (never an asset's newest point)`;
}

function lockNote(location) {
  if (!location) return "Choose the bucket the copies go to.";
  const parts = [location.access === "cold" ? `A cold bucket (recall tier ${location.restore_tier || "Standard"}).` : "A hot bucket: copies are readable at once."];
  if (location.immutable) parts.push(`It locks every copy (Object Lock${location.lock_mode ? ` ${location.lock_mode}` : ""}) until its keep date; nobody can delete it early.`);
  else parts.push("It does not lock objects: a copy can be deleted before its keep date.");
  if (!location.online) parts.push("It did not answer when last opened.");
  return parts.join(" ");
}

function checkboxes(name, options, checked) {
  return h(
    "div",
    { class: "checks" },
    options.map(([value, label, help]) =>
      h("label", { class: "fo-check", title: help || null }, h("input", { type: "checkbox", name, value, checked: checked.includes(value) }), h("span", { text: label })),
    ),
  );
}

/** Add or change a rule. Saving PUTs the whole settings document; the appliance's refusal is
 * shown in words inside the dialog, which stays open. */
function ruleDialog(existing, ctx) {
  const editing = Boolean(existing);
  const rule = existing || { name: "", location: "", classes: ["monthly"], assets: [], min_age_days: 30, storage_class: "GLACIER", keep_days: 365, keep_local_days: null };
  const buckets = ctx.buckets();
  const traits = (l) => [l.access === "cold" ? "cold storage" : "hot", l.immutable ? `locked ${l.lock_mode || ""}`.trim() : null, l.online ? null : "unavailable"].filter(Boolean).join(", ");
  const options = buckets.map((l) => [l.label, `${l.label} (${traits(l)})`]);
  if (rule.location && !buckets.some((l) => l.label === rule.location || l.id === rule.location)) options.unshift([rule.location, `${rule.location} (not a bucket location of this appliance)`]);
  if (!options.length) options.push(["", "No bucket location yet: an administrator adds one under Pools"]);
  const known = buckets.find((l) => l.label === rule.location || l.id === rule.location);
  const locationSelect = select("location", options, known ? known.label : rule.location || options[0][0]);
  const note = h("p", { class: "help", id: "tier-lock-note" });
  const showNote = () => {
    note.textContent = lockNote(ctx.location(locationSelect.value));
  };
  locationSelect.setAttribute("aria-describedby", "tier-lock-note");
  locationSelect.addEventListener("change", showNote);
  showNote();
  const assetNames = ctx.assets.map((a) => a.name);
  for (const name of rule.assets || []) if (!assetNames.includes(name)) assetNames.push(name);
  formDialog({
    title: editing ? `Edit rule ${existing.name}` : "Add a tiering rule",
    description: editing ? null : "A rule copies the recovery points it matches to a bucket, its data in the storage class you choose, kept (and locked, where the bucket locks) until a date. Saved at once; the plan below shows what it would do.",
    submitLabel: editing ? "Save rule" : "Add rule",
    wide: true,
    body: h(
      "div",
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Rule name", name: "name", value: rule.name, required: true, placeholder: "monthly-to-glacier" }),
        h("div", { class: "field" }, h("label", { class: "label", for: "tier-location", text: "Bucket location" }), Object.assign(locationSelect, { id: "tier-location" }), note),
      ),
      h("fieldset", { class: "field" }, h("legend", { class: "label", text: "Which points (none ticked: every point)" }), checkboxes("classes", PERIODS, rule.classes || []), h("p", { class: "help", text: "A point is “monthly” when it is its asset's newest point of its month (UTC), and so on." })),
      h(
        "fieldset",
        { class: "field" },
        h("legend", { class: "label", text: "Of which assets (none ticked: every asset)" }),
        assetNames.length ? checkboxes("assets", assetNames.map((n) => [n, n]), rule.assets || []) : h("p", { class: "help", text: "No asset yet: the rule takes every asset's points." }),
      ),
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Storage class", control: select("storage_class", STORAGE_CLASSES, rule.storage_class || "GLACIER"), help: "Where the copies' data packs go; their index and metadata stay STANDARD, readable at once." }),
        field({ label: "Minimum age (days)", name: "min_age_days", type: "number", min: 0, max: 36500, step: 1, value: rule.min_age_days ?? 0, help: "Points younger than this stay where they are." }),
        field({ label: "Keep copies (days)", name: "keep_days", type: "number", min: 0, max: 36500, step: 1, value: rule.keep_days ?? "", help: "Counted from when the point was made; at a bucket with Object Lock the copy is locked until then. Empty: no date." }),
        field({ label: "Drop the local copy after (days)", name: "keep_local_days", type: "number", min: 0, max: 36500, step: 1, value: rule.keep_local_days ?? "", help: "Days after the bucket's copy was verified. Empty: the local copy stays." }),
      ),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const ticked = (name) => [...form.querySelectorAll(`input[name=${name}]:checked`)].map((i) => i.value);
      const minAge = numberOrNull(el.min_age_days);
      const changed = {
        name: el.name.value.trim(),
        location: el.location.value,
        classes: ticked("classes"),
        assets: ticked("assets"),
        min_age_days: minAge === null ? 0 : minAge,
        storage_class: el.storage_class.value,
        keep_days: numberOrNull(el.keep_days),
        keep_local_days: numberOrNull(el.keep_local_days),
      };
      const rules = ctx.settings().rules.slice();
      if (editing) rules[rules.findIndex((r) => r.name === existing.name)] = changed;
      else rules.push(changed);
      await ctx.save({ rules });
      toast(editing ? `Rule ${changed.name} saved.` : `Rule ${changed.name} added.`);
    },
  });
}

function rulesCard(ctx) {
  const { rules } = ctx.settings();
  const add = ctx.isAdmin ? button("Add rule", { iconName: "plus", kind: "primary", onClick: () => ruleDialog(null, ctx) }) : null;
  const remove = (rule) =>
    confirmDialog({
      title: `Remove rule ${rule.name}?`,
      text: "Runs stop copying points by this rule. Copies it made stay in the bucket (and stay locked until their date).",
      confirmLabel: "Remove rule",
      action: async () => {
        await ctx.save({ rules: ctx.settings().rules.filter((r) => r.name !== rule.name) });
        toast(`Rule ${rule.name} removed.`);
      },
    });
  const actions = (rule) =>
    h(
      "div",
      { class: "row-actions" },
      h("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": `Edit rule ${rule.name}`, onClick: () => ruleDialog(rule, ctx) }, icon("edit")),
      h("button", { type: "button", class: "icon-btn danger", title: "Remove", "aria-label": `Remove rule ${rule.name}`, onClick: () => remove(rule) }, icon("trash")),
    );
  const columns = [
    { label: "Rule", cell: (r) => h("strong", { text: r.name }) },
    { label: "Which points", cell: (r) => whichPoints(r) },
    {
      label: "Goes to",
      cell: (r) => {
        const location = ctx.location(r.location);
        return h("div", { class: "stack" }, h("span", { text: r.location }), pill(r.storage_class, "info"), location ? null : pill("Unknown location", "warn"));
      },
    },
    { label: "Kept", cell: (r) => keptText(r, ctx.location(r.location)) },
    { label: "Local copy", cell: localText, className: "hide-md" },
  ];
  if (ctx.isAdmin) columns.push({ label: "Actions", cell: actions, className: "actions" });
  return card(
    "Rules",
    { subtitle: "Which recovery points go to which bucket, in which class, kept how long. When several rules match a point, the one keeping it longest wins.", actions: add ? [add] : [] },
    rules.length
      ? table(columns, rules, { caption: "Tiering rules", rowAttrs: (r) => ({ dataset: { rule: r.name } }) })
      : emptyState("copy", "No tiering rules", ctx.buckets().length ? "Without a rule, points stay on this appliance only." : "Add a bucket location under Pools first; then a rule that copies aged points to it.", add ? button("Add rule", { iconName: "plus", onClick: () => ruleDialog(null, ctx) }) : null),
  );
}

// --- when runs start, and how fast they upload ----------------------------------------------------------

function scheduleText(settings) {
  const { cron, window_hours: hours } = settings.schedule || {};
  const when = cron ? describeCron(cron) : "Only when started (Run now, or appliance tier run)";
  return { when, window: cron && hours ? `${hours} h from each start; then it waits for the next` : cron ? "No limit" : "—", bandwidth: settings.bandwidth_mib_s ? `${settings.bandwidth_mib_s} MiB/s` : "No limit" };
}

function scheduleCard(ctx) {
  const settings = ctx.settings();
  const words = scheduleText(settings);
  if (!ctx.isAdmin) {
    return card(
      "Schedule and bandwidth",
      {},
      h("dl", { class: "dl" }, h("dt", { text: "Runs start" }), h("dd", { text: words.when }), h("dt", { text: "Time window" }), h("dd", { text: words.window }), h("dt", { text: "Upload limit" }), h("dd", { text: words.bandwidth })),
    );
  }
  const banner = bannerSlot();
  const schedule = settings.schedule || {};
  const cronWords = h("span", { text: schedule.cron ? describeCron(schedule.cron) : "Empty: runs start only when asked." });
  const form = h(
    "form",
    { class: "settings-form", novalidate: true },
    banner.el,
    h(
      "div",
      { class: "grid-3" },
      field({ label: "Runs start (cron, UTC)", name: "cron", value: schedule.cron || "", placeholder: "0 1 * * *", class: "mono", spellcheck: "false", help: cronWords }),
      field({ label: "Time window (hours)", name: "window_hours", type: "number", min: 0, max: 24, step: "any", value: schedule.window_hours ?? "", help: "How long a scheduled run may move data; then it waits for the next start. Empty: no limit." }),
      field({ label: "Upload limit (MiB/s)", name: "bandwidth_mib_s", type: "number", min: 0, step: "any", value: settings.bandwidth_mib_s ?? "", help: "Empty: no limit." }),
    ),
    h("div", { class: "form-foot" }, h("button", { type: "submit", class: "btn btn-primary", text: "Save schedule" })),
  );
  form.elements.cron.addEventListener("input", () => {
    const cron = form.elements.cron.value.trim();
    cronWords.textContent = cron ? describeCron(cron) : "Empty: runs start only when asked.";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const cron = form.elements.cron.value.trim();
      await ctx.save({ schedule: { cron: cron || null, window_hours: numberOrNull(form.elements.window_hours) }, bandwidth_mib_s: numberOrNull(form.elements.bandwidth_mib_s) });
      toast("Tiering schedule saved.");
    } catch (err) {
      markField(form, banner.error(err).field);
    } finally {
      submit.disabled = false;
    }
  });
  return card("Schedule and bandwidth", { subtitle: "Runs also start with Run now. A crash or a closed window is harmless: the next run plans again and skips what is done." }, form);
}

// --- the plan -----------------------------------------------------------------------------------------

function stat(label, value, note) {
  return h("div", { class: "stat" }, h("span", { class: "stat-label", text: label }), h("span", { class: "stat-value", text: value }), note ? h("span", { class: "stat-note", text: note }) : null);
}

function pointCell(row) {
  return h("div", { class: "stack" }, h("a", { class: "mono", href: `#/points?asset=${enc(row.asset)}`, title: row.point, text: shortId(row.point) }), h("span", { class: "muted small", text: row.asset }));
}

function section(title, ...children) {
  return h("section", { class: "tier-section", "aria-label": title }, h("h3", { text: title }), children);
}

function copiesTable(plan, ctx) {
  if (!plan.copies.length) return h("p", { class: "muted", text: "Nothing to copy: every point a rule matches has its copy." });
  return table(
    [
      { label: "Point", cell: pointCell },
      { label: "Size", cell: (c) => bytes(c.bytes), className: "num" },
      { label: "Goes to", cell: (c) => h("div", { class: "stack" }, h("span", { text: c.location }), pill(c.storage_class, "info"), c.resume ? h("span", { class: "muted small", text: "resumes an interrupted copy" }) : null) },
      {
        label: "Locked until",
        cell: (c) => {
          if (!c.retain_until) return h("span", { class: "muted", text: "No date" });
          const location = ctx.location(c.location_id) || ctx.location(c.location);
          const locked = location && location.immutable;
          return h("div", { class: "stack" }, h("span", { text: dateTime(c.retain_until) }), h("span", { class: "muted small", text: locked ? `Object Lock ${location.lock_mode || ""}`.trim() : "kept until then, not locked" }));
        },
      },
      { label: "Rule", cell: (c) => c.rule, className: "hide-md" },
    ],
    plan.copies,
    { caption: "Points a run would copy", rowAttrs: (c) => ({ dataset: { point: c.point } }) },
  );
}

function dropsTable(plan) {
  if (!plan.drops.length) return h("p", { class: "muted", text: "No local copy is due to be dropped." });
  return table(
    [
      { label: "Point", cell: pointCell },
      { label: "Size", cell: (d) => bytes(d.bytes), className: "num" },
      { label: "Kept at", cell: (d) => d.kept_at },
      { label: "Rule", cell: (d) => d.rule, className: "hide-md" },
    ],
    plan.drops,
    { caption: "Local copies a run would drop", rowAttrs: (d) => ({ dataset: { point: d.point } }) },
  );
}

function expiriesTable(plan) {
  if (!plan.expiries.length) return h("p", { class: "muted", text: "No copy has passed its date." });
  return table(
    [
      { label: "Point", cell: pointCell },
      { label: "At", cell: (e) => e.location },
      { label: "Kept until", cell: (e) => dateTime(e.retain_until) },
    ],
    plan.expiries,
    { caption: "Copies past their date", rowAttrs: (e) => ({ dataset: { point: e.point } }) },
  );
}

function costTable(plan) {
  const cost = plan.cost || {};
  const currency = cost.currency || "USD";
  const classes = Object.keys(plan.bytes_by_class || {});
  const dated = `Estimates from the prices of ${cost.as_of || "an unknown date"}${plan.prices_source ? ` (${plan.prices_source})` : ""}; the provider's bill may differ.`;
  if (!classes.length) return h("div", h("p", { class: "muted", text: "Nothing to move: no new storage charge." }), h("p", { class: "muted small", text: dated }));
  const monthly = cost.monthly || {};
  return h(
    "div",
    table(
      [
        { label: "Storage class", cell: (name) => pill(name, "info") },
        { label: "Data", cell: (name) => bytes(plan.bytes_by_class[name]), className: "num" },
        { label: "Uploads", cell: (name) => count(Math.ceil(plan.bytes_by_class[name] / PACK_BYTES), "request"), className: "num hide-md" },
        { label: "Each month", cell: (name) => money(monthly[name], currency), className: "num" },
      ],
      classes,
      { caption: "Estimated monthly cost per storage class", rowAttrs: (name) => ({ dataset: { class: name } }) },
    ),
    h("p", { class: "tier-total", dataset: { total: "" } }, h("strong", { text: `About ${money(cost.monthly_total, currency)} a month` }), `, plus ${money(cost.uploads, currency)} once for the uploads.`),
    h("p", { class: "muted small", text: dated }),
  );
}

function planCard(ctx) {
  const plan = ctx.plan();
  const moved = plan.copies.reduce((sum, c) => sum + (c.bytes || 0), 0);
  const requests = Object.values(plan.bytes_by_class || {}).reduce((sum, b) => sum + Math.ceil(b / PACK_BYTES), 0);
  const cost = plan.cost || {};
  const run = ctx.canRun ? button("Run now", { iconName: "play", kind: "primary", title: "Carry out this plan now, as a job", onClick: (e) => ctx.run(e.currentTarget) }) : null;
  const problems = plan.problems.length
    ? h("div", { class: "banner banner-warning", role: "note" }, icon("alert", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: plan.problems.length === 1 ? "A problem:" : "Problems:" }), h("ul", { class: "plain tier-problems" }, plan.problems.map((p) => h("li", { text: sentence(p) })))))
    : null;
  return card(
    "What a run would do now",
    { subtitle: `Planned ${dateTime(plan.at)}. A preview: nothing moves until a run.`, actions: run ? [run] : [], className: "tier-plan" },
    h(
      "div",
      { class: "card-body" },
      ctx.runNote,
      problems,
      h(
        "div",
        { class: "stats tier-totals" },
        stat("Points to copy", String(plan.copies.length), plan.drops.length ? `${count(plan.drops.length, "local copy", "local copies")} to drop` : "No local copy to drop"),
        stat("Data to move", bytes(moved), plan.expiries.length ? `${count(plan.expiries.length, "copy", "copies")} past their date` : "No copy past its date"),
        stat("Uploads", count(requests, "request"), `${money(cost.uploads, cost.currency)} once`),
        stat("Monthly cost", money(cost.monthly_total, cost.currency), `estimate, prices of ${cost.as_of || "?"}`),
      ),
      section("Copies to buckets", copiesTable(plan, ctx)),
      section("Local copies dropped", dropsTable(plan)),
      section("Copies past their date", expiriesTable(plan)),
      section("Estimated cost", costTable(plan)),
    ),
  );
}

// --- the screen ---------------------------------------------------------------------------------------

export default async function tieringView(view) {
  const body = h("div", loading());
  replace(view.el, pageHeader("Tiering", "Aged recovery points move to cheap, immutable bucket storage by themselves, and come back when a restore needs them."), body);
  let state;
  let locations;
  let assets;
  try {
    [state, locations, assets] = await Promise.all([api.get("/api/tiering"), api.get("/api/locations"), api.get("/api/assets")]);
  } catch (err) {
    view.banner.error(err);
    replace(body);
    return;
  }
  const runNote = h("div", { class: "tier-run", role: "status" });
  const ctx = {
    isAdmin: view.can("admin"),
    canRun: view.can("operator"),
    assets,
    runNote,
    settings: () => state.settings,
    plan: () => state.plan,
    buckets: () => locations.filter((l) => l.kind === "s3_bucket"),
    location: (name) => locations.find((l) => l.label === name || l.id === name) || null,
    /** PUT the settings with `changes` laid over them; the reply's plan replaces the preview. */
    async save(changes) {
      state = await api.put("/api/tiering", { ...state.settings, ...changes });
      draw();
    },
    async run(btn) {
      const job = await busy(btn, view.banner, () => api.post("/api/tiering/run", {}));
      if (!job) return;
      replace(runNote, h("p", { class: "banner banner-success" }, icon("check", "banner-icon"), h("span", { class: "banner-body" }, `Tiering run started (job ${shortId(job.id)}). `, h("a", { href: `#/jobs/${enc(job.id)}`, text: "Watch progress" }))));
      toast("Tiering run started.", { link: { href: `#/jobs/${job.id}`, text: "Watch progress" } });
    },
  };
  const draw = () => replace(body, rulesCard(ctx), scheduleCard(ctx), planCard(ctx));
  draw();
}
