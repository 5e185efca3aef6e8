// Storage › USB disks: the rotation media (in, exporting, safe to remove, out, overdue), what
// each holds and when it was last written; Export now and Eject; USB disks plugged in that are not
// media yet, offered to be initialised (never touched unasked); and the rotation sets.
//
// A known disk plugged in exports by itself: this screen refreshes every few seconds, so the
// export shows up with its progress and then "safe to remove" without a reload.

import { ApiError, api, enc } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { bytes, capitalise, count, dateTime } from "../format.js";
import { busy, button, card, emptyState, field, formDialog, loading, pill, table, toast } from "../ui.js";
import { jobProgress, startedJobs, storageHeader } from "./disks.js";

const REFRESH_MS = 2000;
const STATES = {
  in: ["In", "info", "Plugged in; its export has not run since."],
  exporting: ["Exporting", "info", "Its export is running: do not pull it."],
  safe_to_remove: ["Safe to remove", "good", "Written, flushed and unmounted: it may be pulled."],
  out: ["Out", "neutral", "Not plugged in."],
};

function sentence(text) {
  const t = capitalise(String(text || "").trim());
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

function statePills(m) {
  const [words, tone, title] = STATES[m.state] || [capitalise(m.state), "neutral", null];
  return h(
    "div",
    { class: "stack" },
    pill(m.state === "safe_to_remove" && !m.safe_to_remove ? "Mounted again" : words, m.state === "safe_to_remove" && !m.safe_to_remove ? "warn" : tone, title),
    m.overdue_days ? pill(`Overdue by ${count(m.overdue_days, "day")}`, "warn", "Not written for longer than its set's rotation period: bring it back.") : null,
  );
}

function writtenText(m) {
  if (!m.last_written) return h("span", { class: "muted", text: "Never" });
  return h("span", { text: dateTime(m.last_written) });
}

// --- the media ------------------------------------------------------------------------------------

function mediaCard(media, jobsById, ctx) {
  const canRun = ctx.view.can("operator");
  const safe = media.filter((m) => m.safe_to_remove && m.state === "safe_to_remove");
  const notices = safe.map((m) => h("p", { class: "banner banner-success", role: "status", dataset: { safe: m.label } }, icon("check", "banner-icon"), h("span", { class: "banner-body", text: `USB disk ${m.label} is safe to remove.` })));
  const rows = table(
    [
      {
        label: "Disk",
        cell: (m) => h("div", { class: "stack" }, h("strong", { text: m.label }), h("span", { class: "muted small", text: [m.model, m.serial].filter(Boolean).join(" · ") || "USB disk" }), h("span", { class: "muted small mono truncate", title: m.identity, text: m.identity })),
      },
      { label: "Set", cell: (m) => m.set_name },
      { label: "State", cell: statePills },
      { label: "Last written", cell: writtenText },
      { label: "Points", cell: (m) => count(m.points, "point"), className: "num hide-md" },
      {
        label: "Now",
        cell: (m) => {
          const job = m.active_job ? jobsById.get(m.active_job) : null;
          if (job) return h("div", { class: "stack" }, h("a", { href: `#/jobs/${enc(job.id)}`, class: "small", text: capitalise(job.description) }), jobProgress(job));
          return m.message ? h("span", { class: "small warn-text", text: sentence(m.message) }) : h("span", { class: "muted", text: "—" });
        },
      },
      {
        label: "Actions",
        className: "actions",
        cell: (m) =>
          canRun
            ? h(
                "div",
                { class: "row-actions" },
                button("Export now", { kind: "small", "aria-label": `Export to ${m.label} now`, title: "Copy the set's points to this disk now (it waits until the disk is plugged in)", onClick: (e) => ctx.run(e.currentTarget, `/api/media/${enc(m.identity)}/export`, `Export to ${m.label}`) }),
                m.mounted || ["in", "exporting"].includes(m.state) ? button("Eject", { kind: "small", "aria-label": `Eject ${m.label}`, title: "Flush and unmount the disk so it can be pulled", onClick: (e) => ctx.run(e.currentTarget, `/api/media/${enc(m.identity)}/eject`, `Eject of ${m.label}`) }) : null,
              )
            : null,
      },
    ],
    media,
    { caption: "USB disks", rowAttrs: (m) => ({ dataset: { medium: m.label, state: m.state } }) },
  );
  return card(
    "Rotation disks",
    { subtitle: "Plug one in and its set's newest points are copied to it, checked, and the disk unmounted: pull it when it says safe to remove." },
    notices,
    media.length ? rows : emptyState("disk", "No USB disks yet", "Plug in a USB disk: it is offered below, and an administrator initialises it for a rotation set."),
  );
}

// --- offered disks ---------------------------------------------------------------------------------

function initialiseDialog(d, sets, ctx) {
  const names = sets.map((s) => s.name);
  const what = `${d.devnode || "the disk"} (${[d.vendor, d.model].filter(Boolean).join(" ") || "USB disk"}, ${bytes(d.size_bytes)})`;
  formDialog({
    title: "Initialise a USB disk",
    description: "The disk becomes rotation media of this appliance: a filesystem of its own with its label, a store location, a member of a rotation set. Plugged in later, it is written by itself.",
    submitLabel: "Initialise (erase the disk)",
    danger: true,
    body: h(
      "div",
      h("div", { class: "banner banner-warning", role: "note" }, icon("alert", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: `Everything on ${what} is erased.` }), d.fs_type ? ` It holds a ${d.fs_type} filesystem${d.fs_label ? ` labelled “${d.fs_label}”` : ""}.` : "")),
      field({ label: "Label", name: "label", placeholder: "OFFSITE-A", maxlength: 16, help: "Written on the disk (1-16 letters, digits, “_”, “.”, “-”). Empty: appl-<set>-<n>." }),
      field({ label: "Rotation set", name: "set", value: names[0] || "Offsite", list: "media-set-names", required: true, help: "Disks of one set take turns; a new name makes a new set." }),
      h("datalist", { id: "media-set-names" }, names.map((n) => h("option", { value: n }))),
      h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "erase" }), h("span", { text: "I understand that everything on this disk is erased" })),
    ),
    onSubmit: async (form) => {
      if (!form.elements.erase.checked) throw new ApiError(400, "invalid_input", "tick the box to confirm that the disk may be erased", { field: "erase" });
      const label = form.elements.label.value.trim();
      const body = { disk: d.identity, set: form.elements.set.value.trim() || "Offsite" };
      if (label) body.label = label;
      await ctx.jobs.submit("/api/media", body, `Initialising USB disk ${label || d.devnode}`);
    },
  });
}

function offeredCard(offered, sets, ctx) {
  const isAdmin = ctx.view.can("admin");
  const rows = table(
    [
      { label: "Disk", cell: (d) => h("div", { class: "stack" }, h("strong", { text: [d.vendor, d.model].filter(Boolean).join(" ") || "USB disk" }), h("span", { class: "muted small", text: d.serial || "" }), h("span", { class: "muted small mono", text: d.present ? d.devnode : "not plugged in" })) },
      { label: "Size", cell: (d) => bytes(d.size_bytes), className: "num" },
      { label: "Holds", cell: (d) => (d.fs_type ? `${d.fs_type}${d.fs_label ? ` “${d.fs_label}”` : ""}` : h("span", { class: "muted", text: "Nothing recognised" })) },
      { label: "Seen", cell: (d) => dateTime(d.seen_at), className: "hide-md" },
      {
        label: "May be initialised",
        cell: (d) => (d.refusals.length ? h("ul", { class: "plain small refusals" }, d.refusals.map((r) => h("li", { text: sentence(r) }))) : pill("Yes", "good")),
      },
      {
        label: "Actions",
        className: "actions",
        cell: (d) => (isAdmin ? button("Initialise…", { kind: "small", "aria-label": `Initialise ${d.devnode || d.identity}`, disabled: d.refusals.length > 0, title: d.refusals.length ? sentence(d.refusals[0]) : "Erase it and make it rotation media", onClick: () => initialiseDialog(d, sets, ctx) }) : null),
      },
    ],
    offered,
    { caption: "USB disks offered", rowAttrs: (d) => ({ dataset: { offered: d.identity } }) },
  );
  return card(
    "USB disks plugged in that are not media",
    { subtitle: "The appliance never mounts or writes these by itself. Initialise one to make it rotation media (it is erased)." },
    offered.length ? rows : h("p", { class: "muted", text: "None: every USB disk plugged in is rotation media (or none is plugged in)." }),
  );
}

// --- rotation sets ---------------------------------------------------------------------------------

function exportsText(s) {
  const what = s.assets.length ? s.assets.join(", ") : "every asset";
  return `Newest ${count(s.keep_newest, "point")} of ${what}${s.verify ? ", checked after copying" : ""}`;
}

function disksText(s) {
  const st = s.status;
  if (!st.media.length) return h("span", { class: "muted", text: "No disk yet" });
  return h(
    "ul",
    { class: "plain small" },
    st.media.map((m) =>
      h(
        "li",
        { dataset: { member: m.label } },
        h("strong", { text: m.label }),
        ` ${m.present ? "in" : "out"}, written ${m.last_written ? dateTime(m.last_written) : "never"}`,
        m.overdue_days ? h("span", { class: "warn-text", text: ` (overdue by ${count(m.overdue_days, "day")})` }) : null,
      ),
    ),
    st.next_to_insert ? h("li", { class: "muted", text: `Bring back next: ${st.next_to_insert}` }) : null,
    st.problems.map((p) => h("li", { class: "warn-text", text: sentence(p) })),
  );
}

function setDialog(existing, assets, ctx) {
  const s = existing || { name: "", assets: [], keep_newest: 1, rotate_days: 7, verify: true };
  const names = [...new Set([...assets.map((a) => a.name), ...s.assets])];
  formDialog({
    title: existing ? `Rotation set ${s.name}` : "Add a rotation set",
    description: "What goes on the set's disks each time one is plugged in, and how often a disk should come back.",
    submitLabel: existing ? "Save set" : "Add set",
    body: h(
      "div",
      field({ label: "Set name", name: "name", value: s.name, required: true, readonly: Boolean(existing), placeholder: "Offsite" }),
      h(
        "fieldset",
        { class: "field" },
        h("legend", { class: "label", text: "Assets exported (none ticked: every asset)" }),
        names.length ? h("div", { class: "checks" }, names.map((n) => h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "assets", value: n, checked: s.assets.includes(n) }), h("span", { text: n })))) : h("p", { class: "help", text: "No asset yet: every asset is exported." }),
      ),
      h(
        "div",
        { class: "grid-2" },
        field({ label: "Newest points of each asset", name: "keep_newest", type: "number", min: 1, max: 1000, step: 1, value: s.keep_newest }),
        field({ label: "A disk comes back every (days)", name: "rotate_days", type: "number", min: 1, max: 3650, step: 1, value: s.rotate_days, help: "A disk not written for longer is overdue." }),
      ),
      h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "verify", checked: s.verify }), h("span", { text: "Read every exported point back before the disk is declared safe to remove" })),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const body = {
        name: el.name.value.trim(),
        assets: [...form.querySelectorAll("input[name=assets]:checked")].map((i) => i.value),
        keep_newest: Number(el.keep_newest.value),
        rotate_days: Number(el.rotate_days.value),
        verify: el.verify.checked,
      };
      await api.put("/api/rotation", { sets: [body] });
      toast(`Rotation set ${body.name} saved.`);
      ctx.refresh();
    },
  });
}

function setsCard(sets, assets, ctx) {
  const isAdmin = ctx.view.can("admin");
  const columns = [
    { label: "Set", cell: (s) => h("strong", { text: s.name }) },
    { label: "Exports", cell: exportsText },
    { label: "Rotation", cell: (s) => `A disk comes back every ${count(s.rotate_days, "day")}` },
    { label: "Disks", cell: disksText },
  ];
  if (isAdmin) columns.push({ label: "Actions", className: "actions", cell: (s) => button("Edit", { kind: "small", "aria-label": `Edit rotation set ${s.name}`, onClick: () => setDialog(s, assets, ctx) }) });
  const add = isAdmin ? [button("Add set", { iconName: "plus", onClick: () => setDialog(null, assets, ctx) })] : [];
  return card(
    "Rotation sets",
    { subtitle: "Disks of a set take turns: one is plugged in, the others are away.", actions: add },
    sets.length ? table(columns, sets, { caption: "Rotation sets", rowAttrs: (s) => ({ dataset: { set: s.name } }) }) : h("p", { class: "muted", text: "No rotation set yet: initialising a disk makes its set (“Offsite” by default)." }),
  );
}

// --- the screen ------------------------------------------------------------------------------------

export default async function mediaView(view) {
  const body = h("div", loading());
  const jobs = startedJobs(view, { onEnd: () => refresh() });
  replace(view.el, storageHeader("media", "USB disks that take turns off-site: each is written by itself when plugged in."), jobs.el, body);
  let timer = null;
  let stopped = false;
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });
  const ctx = {
    view,
    jobs,
    refresh: () => refresh(),
    run: (btn, path, label) => busy(btn, view.banner, () => jobs.submit(path, {}, label)),
  };
  let assets = [];
  try {
    assets = await api.get("/api/assets");
  } catch {
    assets = [];
  }

  async function refresh() {
    clearTimeout(timer);
    let media;
    let offered;
    let sets;
    try {
      [media, offered, sets] = await Promise.all([api.get("/api/media"), api.get("/api/media/offered"), api.get("/api/rotation")]);
    } catch (err) {
      if (!stopped) view.banner.error(err);
      return;
    }
    const active = [...new Set(media.map((m) => m.active_job).filter(Boolean))];
    const found = await Promise.all(active.map((id) => api.get(`/api/jobs/${enc(id)}`).catch(() => null)));
    if (stopped) return;
    const jobsById = new Map(found.filter(Boolean).map((j) => [j.id, j]));
    // Redraw unless a dialog is open over the screen (its form would lose what was typed).
    if (!document.querySelector("dialog[open]")) replace(body, mediaCard(media, jobsById, ctx), offeredCard(offered, sets, ctx), setsCard(sets, assets, ctx));
    timer = setTimeout(refresh, REFRESH_MS);
  }
  await refresh();
}
