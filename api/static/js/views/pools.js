// Storage › Pools: the disks backups are stored on, their capacity, health and how fast they
// fill; making, scrubbing, repairing and importing pools; and every location that holds copies
// (this appliance's pools, folders, disks and buckets).

import { api, enc } from "../api.js";
import { capacityChart, usableBytes } from "../chart.js";
import { h, icon, replace } from "../dom.js";
import { LOCATION_NAMES, bytes, capitalise, count, percent } from "../format.js";
import { busy, button, card, deleteButton, emptyState, field, formDialog, loading, pill, progressBar, select, table, toast } from "../ui.js";
import { createPoolDialog, startedJobs, storageHeader } from "./disks.js";

function fullText(days) {
  if (days === null || days === undefined) return "Not at the current rate";
  if (days > 3650) return "More than 10 years at this rate";
  return `~${Math.max(1, Math.round(days))} days at this rate`;
}

const HEALTH = {
  ok: ["Healthy", "good"],
  warning: ["Warning", "warn"],
  degraded: ["Degraded", "warn"],
  damaged: ["Damaged", "bad"],
  unavailable: ["Unavailable", "bad"],
};

function sentence(text) {
  const t = capitalise(String(text || "").trim());
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

function layoutText(p) {
  if (p.kind !== "block") return "A folder in the data directory";
  const n = p.members.length;
  const how = { single: "one copy", raid1: "mirrored: two copies of every block", raid10: "mirrored and striped" }[p.profile] || p.profile;
  return `${p.fs_type} on ${count(n, "disk")}, ${how}`;
}

/** The pool's growth chart (js/chart.js) from its daily usage samples. */
function growthChart(p) {
  const series = (p.usage_history || []).map((s) => ({ day: s.day, bytes: s.used_bytes }));
  if (series.length < 2) return h("p", { class: "muted small pool-chart", text: "The growth chart and forecast appear once the pool's usage has been sampled on two days (it is sampled every hour)." });
  const chart = capacityChart({ used_bytes: p.used_bytes, free_bytes: p.free_bytes, growth_bytes_per_day: p.growth_bytes_per_day, days_until_full: p.days_until_full, series }, Date.now());
  return h("div", { class: "pool-chart" }, chart);
}

function membersList(p) {
  return h(
    "ul",
    { class: "plain small pool-members" },
    p.members.map((m) =>
      h(
        "li",
        { dataset: { member: m.identity } },
        m.missing ? pill("Missing", "bad") : pill("Present", "good"),
        " ",
        h("span", { class: "mono", text: m.identity }),
        m.devnode ? h("span", { class: "muted", text: ` at ${m.devnode}${m.size_bytes ? `, ${bytes(m.size_bytes)}` : ""}` }) : null,
      ),
    ),
  );
}

function scrubText(last) {
  if (!last) return "Never";
  const found = last.uncorrectable ? `${last.uncorrectable} error(s) could not be repaired` : last.corrected ? `${last.corrected} bad block(s) repaired` : "no errors";
  return `${capitalise(last.status || "finished")}${last.started ? ` (started ${last.started})` : ""}: ${found}`;
}

function poolCard(p, ctx) {
  const total = usableBytes(p);
  const fraction = p.used_bytes / total;
  const tone = fraction >= 0.9 ? "bad" : fraction >= 0.75 ? "warn" : "good";
  const full = p.days_until_full;
  const [healthWords, healthTone] = HEALTH[p.health] || [capitalise(p.health), "neutral"];
  const btrfs = p.kind === "block" && p.fs_type === "btrfs";
  const mirrored = btrfs && ["raid1", "raid10"].includes(p.profile);
  const actions = [
    btrfs && ctx.view.can("operator") ? button("Scrub", { kind: "small", "aria-label": `Scrub pool ${p.name}`, title: "Read every copy of every block and repair bad copies from good ones", onClick: (e) => ctx.scrub(p, e.currentTarget) }) : null,
    mirrored && ctx.view.can("admin") ? button("Replace disk", { kind: "small", "aria-label": `Replace a disk of pool ${p.name}`, onClick: () => ctx.replace(p) }) : null,
  ].filter(Boolean);
  const system = p.warnings.includes("shares the system disk");
  return card(
    null,
    { className: "pool" },
    h(
      "div",
      { class: "pool-head", dataset: { pool: p.name } },
      h("span", { class: "pool-icon" }, icon("pools")),
      h("div", { class: "stack" }, h("h2", { text: p.name }), h("span", { class: "muted small", text: layoutText(p) }), h("span", { class: "muted small mono break", text: p.mountpoint || p.path })),
      pill(healthWords, healthTone, p.health_reasons.join(" ") || null),
    ),
    system
      ? h("div", { class: "banner banner-warning", role: "note" }, icon("alert", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: "Shares the system disk." }), " When that disk fails, the points here go with it: add a pool on disks of its own, or copy the points elsewhere."))
      : null,
    p.health_reasons.length ? h("ul", { class: "plain pool-reasons" }, p.health_reasons.map((r) => h("li", { class: healthTone === "bad" ? "error-text" : "warn-text", text: sentence(r) }))) : null,
    p.mounted
      ? [
          h("div", { class: `pool-bar pool-${tone}` }, progressBar(fraction, `Space used on ${p.name}`)),
          h("p", { class: "pool-usage" }, h("strong", { text: `${bytes(p.used_bytes)} used` }), ` of ${bytes(total)} usable (${percent(fraction)}); ${bytes(p.free_bytes)} free`),
          growthChart(p),
        ]
      : h("p", { class: "error-text", text: "Not mounted: its capacity is unknown until its disks are back." }),
    h(
      "dl",
      { class: "dl dl-grid" },
      h("dt", { text: "Backup store" }),
      h("dd", { text: bytes(p.store_bytes) }),
      h("dt", { text: "Recovery points" }),
      h("dd", { text: count(p.points, "point") }),
      h("dt", { text: "Growth" }),
      h("dd", { text: p.growth_bytes_per_day > 0 ? `${bytes(p.growth_bytes_per_day)} a day` : "None in 30 days" }),
      h("dt", { text: "Full in" }),
      h("dd", { class: full !== null && full < 30 ? "error-text" : null, text: fullText(full) }),
      h("dt", { text: "Disk size" }),
      h("dd", { text: bytes(p.total_bytes) }),
      p.kind === "block" ? [h("dt", { text: "Last scrub" }), h("dd", { text: btrfs ? scrubText(p.last_scrub) : "Not scrubbed (no checksums)" })] : null,
      h("dt", { text: "Store ID" }),
      h("dd", { class: "mono small", text: p.store_id }),
    ),
    p.kind === "block" ? h("div", { class: "pool-disks" }, h("h3", { text: `Disks (${p.members.length})` }), membersList(p)) : null,
    actions.length ? h("div", { class: "pool-actions row-actions" }, actions) : null,
  );
}

/** Rebuild a missing or failing member of a mirrored pool onto a new disk (administrators). */
async function replaceDialog(p, ctx) {
  let disks;
  try {
    disks = (await api.get("/api/disks")).disks.filter((d) => d.eligible);
  } catch (err) {
    ctx.view.banner.error(err);
    return;
  }
  const members = [...p.members].sort((a, b) => Number(b.missing) - Number(a.missing));
  formDialog({
    title: `Replace a disk of ${p.name}`,
    description: "The pool's other copy is rebuilt onto the new disk, which takes the old one's place; the pool stays in use meanwhile. The new disk is erased.",
    submitLabel: "Replace disk",
    danger: true,
    body: h(
      "div",
      field({ label: "Disk to replace", control: select("member", members.map((m) => [m.identity, `${m.identity}${m.missing ? " (missing)" : m.devnode ? ` at ${m.devnode}` : ""}`]), members.length ? members[0].identity : "") }),
      field({
        label: "New disk",
        control: select("disk", disks.length ? disks.map((d) => [d.identity, `${d.devnode} · ${bytes(d.size_bytes)} · ${d.identity}`]) : [["", "No disk may join a pool now (see Disks)"]], ""),
        help: "Only disks that may join a pool are offered; it must be at least as large as the one it replaces.",
      }),
    ),
    onSubmit: async (form) => {
      const body = { member: form.elements.member.value, disk: form.elements.disk.value };
      await ctx.jobs.submit(`/api/pools/${enc(p.name)}/replace`, body, `Replacing a disk of pool ${p.name}`);
    },
  });
}

/** Pools found on the disks that this appliance does not know (administrators import them). */
function importCard(found, ctx) {
  const rows = found.length
    ? table(
        [
          { label: "Pool", cell: (f) => h("div", { class: "stack" }, h("strong", { text: f.name }), h("span", { class: "muted small mono", text: f.fs_uuid })) },
          { label: "Filesystem", cell: (f) => `${f.fs_type} “${f.label}”` },
          { label: "Disks", cell: (f) => h("ul", { class: "plain small" }, f.disks.map((d) => h("li", { text: `${d.devnode} · ${bytes(d.size_bytes)}` }))) },
          {
            label: "Actions",
            className: "actions",
            cell: (f) => button("Import", { kind: "small", "aria-label": `Import pool ${f.name}`, onClick: (e) => busy(e.currentTarget, ctx.view.banner, () => ctx.jobs.submit("/api/pools/import", { fs_uuid: f.fs_uuid }, `Import of pool ${f.name}`)) }),
          },
        ],
        found,
        { caption: "Pools found on the disks", rowAttrs: (f) => ({ dataset: { importable: f.fs_uuid } }) },
      )
    : h("p", { class: "muted", text: "No pool of another appliance (or of this one before a reinstall) is on the attached disks." });
  return card("Pools found on the disks", { subtitle: "Importing mounts the pool, adds its points to the catalog and keeps using it. A pool of another store needs a fresh data directory: appliance pool import." }, rows);
}

const COLD_CLASSES = [
  ["GLACIER", "GLACIER (recall in minutes to hours)"],
  ["DEEP_ARCHIVE", "DEEP_ARCHIVE (cheapest; recall in hours)"],
];
const HOT_CLASSES = [
  ["", "STANDARD (the bucket's default)"],
  ["STANDARD_IA", "STANDARD_IA"],
  ["ONEZONE_IA", "ONEZONE_IA"],
  ["INTELLIGENT_TIERING", "INTELLIGENT_TIERING"],
  ["GLACIER_IR", "GLACIER_IR (instant retrieval)"],
];
const TIERS = [
  ["Expedited", "Expedited (typically 1-5 minutes)"],
  ["Standard", "Standard (typically 3-5 hours)"],
  ["Bulk", "Bulk (typically 5-12 hours)"],
];

/** Add an S3 (or S3-compatible) bucket as a location. The secret key is sent once and never
 * shown again: the appliance keeps it apart from its catalog. */
function addBucketDialog(reload) {
  const dataClass = select("data_class", HOT_CLASSES, "");
  const tier = select("restore_tier", TIERS, "Standard", { disabled: true });
  const lockDays = h("input", { type: "number", name: "lock_days", min: 1, max: 36500, step: 1, value: "30", disabled: true });
  const lockMode = select("lock_mode", [["", "No lock"], ["COMPLIANCE", "COMPLIANCE (nobody can delete early)"], ["GOVERNANCE", "GOVERNANCE (special permission can delete early)"]], "");
  const cold = h("input", { type: "checkbox", name: "cold" });
  cold.addEventListener("change", () => {
    replace(dataClass, (cold.checked ? COLD_CLASSES : HOT_CLASSES).map(([v, text]) => h("option", { value: v, text })));
    tier.disabled = !cold.checked;
  });
  lockMode.addEventListener("change", () => {
    lockDays.disabled = !lockMode.value;
  });
  formDialog({
    title: "Add a bucket",
    description: "An S3 or S3-compatible bucket that will hold copies of recovery points. The appliance checks at once that the bucket exists and takes the keys.",
    submitLabel: "Add bucket",
    wide: true,
    body: h(
      "div",
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Bucket", name: "address", required: true, placeholder: "s3://my-bucket/appliance", help: "s3://BUCKET, optionally with a folder (prefix) inside it." }),
        field({ label: "Name", name: "label", placeholder: "offsite-bucket" }),
        field({ label: "Endpoint", name: "endpoint_url", placeholder: "https://s3.example.com", help: "Empty for AWS S3; the address of any other S3-compatible storage." }),
        field({ label: "Region", name: "region", placeholder: "us-east-1" }),
        field({ label: "Access key", name: "access_key_id", autocomplete: "off", spellcheck: "false" }),
        field({ label: "Secret key", name: "secret_access_key", type: "password", autocomplete: "new-password", help: "Kept apart from the catalog and never shown again." }),
        field({ label: "Addressing", control: select("addressing_style", [["", "Automatic"], ["path", "Path style (most S3-compatible storage)"], ["virtual", "Virtual-hosted style"]], "") }),
      ),
      h("label", { class: "fo-check" }, cold, h("span", { text: "Cold storage: data goes to an archive class (cheap, but a restore first recalls it, which takes minutes to hours)" })),
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Data class", control: dataClass, help: "Where the copies' data goes; their index and metadata stay readable at once." }),
        field({ label: "Restore tier", control: tier, help: "How fast (and how dear) a recall is. Cold storage only." }),
        field({ label: "Object Lock", control: lockMode, help: "The bucket must have Object Lock enabled." }),
        field({ label: "Days locked", control: lockDays, help: "Each copy cannot be deleted or changed for this many days." }),
      ),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      let address = el.address.value.trim();
      if (address && !address.startsWith("s3://")) address = `s3://${address}`;
      const bucket = { cold: el.cold.checked };
      for (const name of ["endpoint_url", "region", "access_key_id", "secret_access_key", "addressing_style", "data_class"]) {
        const value = el[name].value.trim();
        if (value) bucket[name] = value;
      }
      if (bucket.cold) bucket.restore_tier = el.restore_tier.value;
      if (el.lock_mode.value) {
        bucket.lock_mode = el.lock_mode.value;
        bucket.lock_days = Number(el.lock_days.value);
      }
      await api.post("/api/locations", { kind: "s3_bucket", address, label: el.label.value.trim(), bucket });
      toast("Bucket added.");
      reload();
    },
  });
}

/** How a location keeps its copies: hot or cold (and the class), locked or not. */
function storageCell(l) {
  const parts = [];
  if (l.access === "cold") {
    parts.push(pill(`Cold · ${l.data_class || "GLACIER"}`, "info", `A restore first recalls the data (tier ${l.restore_tier || "Standard"}).`));
    parts.push(h("span", { class: "muted small", text: `Recall tier ${l.restore_tier || "Standard"}` }));
  } else if (l.kind === "s3_bucket") {
    parts.push(pill(`Hot${l.data_class ? ` · ${l.data_class}` : ""}`, "neutral", "Readable at once."));
  } else {
    parts.push(pill(l.access === "sequential" ? "Sequential" : "Hot", "neutral", "Readable at once."));
  }
  if (l.immutable) {
    const days = l.lock_days ? `, ${count(l.lock_days, "day")}` : "";
    parts.push(pill(`Locked (${l.lock_mode || "Object Lock"}${days})`, "good", "Copies here cannot be deleted or changed until their protection ends."));
  }
  if (l.kind === "s3_bucket") {
    const where = [l.endpoint_url || "AWS S3", l.region].filter(Boolean).join(", ");
    parts.push(h("span", { class: "muted small truncate", title: where, text: where }));
  }
  return h("div", { class: "stack" }, parts);
}

function stateCell(l) {
  if (l.online) return pill("Available", "good");
  return h(
    "div",
    { class: "stack" },
    pill("Unavailable", "warn", l.reason || "Not mounted, missing, or holding another store's data"),
    l.reason ? h("span", { class: "small error-text", dataset: { reason: "" }, text: l.reason }) : null,
  );
}

/** Every place that holds copies of the store, whether it answers now, how it keeps its copies,
 * and how many points it holds in full. Administrators add a folder (a mounted disk) or a bucket,
 * or remove a location; operators check whether a location answers now. */
function locationsCard(locations, view, reload, redraw) {
  const isAdmin = view.session.role === "admin";
  const canCheck = view.can("operator");
  const add = () =>
    formDialog({
      title: "Add a location",
      description: "An empty folder, usually a disk mounted there, that will hold copies of recovery points.",
      submitLabel: "Add location",
      body: h(
        "div",
        field({ label: "Folder", name: "path", required: true, placeholder: "/mnt/backup-disk-2", help: "A full path. It must be empty (or already a location of this appliance), and not a system folder." }),
        field({ label: "Name", name: "label", placeholder: "backup-disk-2" }),
        h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "require_mount", checked: true }), h("span", { text: "Only when a disk is mounted there (an unmounted disk is shown as unavailable, never as empty)" })),
      ),
      onSubmit: async (form) => {
        const body = { path: form.elements.path.value.trim(), label: form.elements.label.value.trim(), require_mount: form.elements.require_mount.checked };
        await api.post("/api/locations", body);
        toast("Location added.");
        reload();
      },
    });
  const check = async (l, btn) => {
    const answer = await busy(btn, view.banner, () => api.post(`/api/locations/${enc(l.id)}/check`, {}));
    if (!answer) return;
    toast(answer.online ? `${answer.label} is available.` : `${answer.label} is unavailable: ${answer.reason || "it did not answer"}.`, { kind: answer.online ? "success" : "error" });
    redraw(locations.map((x) => (x.id === answer.id ? answer : x)));
  };
  const rows = table(
    [
      {
        label: "Location",
        cell: (l) =>
          h(
            "div",
            { class: "stack" },
            h("strong", { text: l.label }),
            h("span", { class: "muted small mono truncate", title: l.address, text: l.address }),
            h("span", { class: "muted small", text: `${LOCATION_NAMES[l.kind] || l.kind}${l.home ? " (this appliance's pool)" : ""}${l.offsite ? ", off-site" : ""}` }),
          ),
      },
      { label: "Storage", cell: storageCell },
      { label: "State", cell: stateCell },
      { label: "Points held", cell: (l) => count(l.copies, "point"), className: "num" },
      {
        label: "Actions",
        className: "actions",
        cell: (l) =>
          h(
            "div",
            { class: "row-actions" },
            canCheck && !l.home ? button("Check", { kind: "small", "aria-label": `Check location ${l.label}`, title: "Open the location now and check that it holds this appliance's store", onClick: (e) => check(l, e.currentTarget) }) : null,
            isAdmin && !l.home
              ? deleteButton({ label: `Remove location ${l.label}`, title: `Remove location ${l.label}?`, text: "The appliance forgets this location; the data on it is left alone. A location that still holds copies cannot be removed.", confirmLabel: "Remove location", path: `/api/locations/${enc(l.id)}`, deleted: "Location removed.", done: reload })
              : null,
          ),
      },
    ],
    locations,
    { caption: "Locations", rowAttrs: (l) => ({ dataset: { location: l.label } }) },
  );
  const actions = isAdmin ? [button("Add location", { iconName: "plus", kind: "primary", onClick: add }), button("Add bucket", { iconName: "plus", onClick: () => addBucketDialog(reload) })] : [];
  return card("Locations", { subtitle: "Every place that holds copies of recovery points.", actions }, rows);
}

export default async function poolsView(view) {
  const body = h("div", loading());
  const isAdmin = view.can("admin");
  const jobs = startedJobs(view, { onEnd: () => load() });
  const create = isAdmin ? button("Create pool", { iconName: "plus", kind: "primary", onClick: () => openCreate() }) : null;
  replace(view.el, storageHeader("pools", "The disks recovery points are stored on, and every place that holds copies.", ...[create].filter(Boolean)), jobs.el, body);
  const ctx = {
    view,
    jobs,
    scrub: (p, btn) => busy(btn, view.banner, () => jobs.submit(`/api/pools/${enc(p.name)}/scrub`, {}, `Scrub of pool ${p.name}`)),
    replace: (p) => replaceDialog(p, ctx),
  };
  async function openCreate() {
    try {
      createPoolDialog((await api.get("/api/disks")).disks, jobs);
    } catch (err) {
      view.banner.error(err);
    }
  }
  const poolsBox = h("div", { class: "pools" });
  const importBox = h("div", { class: "import-box" });
  const locationsBox = h("div", { class: "locations-box" });
  replace(body, poolsBox, importBox, locationsBox);
  const reload = () => view.navigate(location.hash);
  const redraw = (list) => replace(locationsBox, locationsCard(list, view, reload, redraw));

  async function load() {
    let pools;
    let locations;
    let found = [];
    try {
      [pools, locations, found] = await Promise.all([api.get("/api/pools"), api.get("/api/locations"), isAdmin ? api.get("/api/pools/importable") : Promise.resolve([])]);
    } catch (err) {
      view.banner.error(err);
      return;
    }
    replace(poolsBox, pools.length ? pools.map((p) => poolCard(p, ctx)) : card(null, {}, emptyState("pools", "No pools", "The appliance stores points in its data directory's pool; if it is missing, check the disk it lives on.")));
    replace(importBox, isAdmin ? importCard(found, ctx) : null);
    redraw(locations);
  }
  await load();
}
