// Hosts: the machines around the appliance that it protects (GET /api/hosts). Three kinds:
// - a backup client ("client"): the host runs appliance-client with a token scoped to its asset;
//   adding one shows the install command (with the token) once, ready to paste;
// - an SSH host ("ssh", agentless): the appliance logs in with its own key and pulls folders over
//   SFTP; adding one scans the host key, and nothing is pulled until an administrator compares
//   the offered fingerprint and trusts it (the folders then become assets);
// - a KVM/libvirt host ("libvirt"): reached over SSH the same way; its VMs are listed and
//   protected one by one (GET/POST /api/hosts/{name}/vms). The page reads GET's answer as a list (or {vms: [...]})
//   of {name (or domain), state?, protected?, asset?, live_backup?, reason?}: a VM with an asset
//   (and protected not false) is protected; live_backup false shows the reason and offers the
//   offline backup. POST takes {domain, allow_offline}; the list is read again after it.
//
// Every role reads the table; operators start "Back up now" and client restores; administrators
// add, trust and remove hosts. Nothing is claimed that the answer does not say: a host that never
// made contact says "never", an asset without a point says "no point yet".

import { api, enc } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { ago, capitalise, count, dateTime, secondsSince } from "../format.js";
import { busy, button, card, confirmDialog, emptyState, field, formDialog, loading, pageHeader, pill, select, setApplies, table, toast } from "../ui.js";

const KIND_NAMES = { client: "Backup client", ssh: "SSH (agentless)", libvirt: "KVM/libvirt" };
/** Polled this often; more often while a backup started here is still running. */
const POLL_IDLE_MS = 30000;
const POLL_ACTIVE_MS = 2000;

function sentence(text) {
  const t = capitalise(String(text || "").trim());
  return t && !/[.!?]$/.test(t) ? `${t}.` : t;
}

function lines(text) {
  return String(text || "")
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

/** A read-only value with a Copy button (the install command, a key line, a fingerprint). */
function copyBox({ label, value, rows = 0, dataName = null }) {
  const id = `copy-${Math.random().toString(36).slice(2)}`;
  const attrs = { id, readonly: true, class: "mono", spellcheck: "false", dataset: dataName ? { [dataName]: "" } : null };
  const input = rows ? h("textarea", { ...attrs, rows, text: value }) : h("input", { ...attrs, type: "text", value });
  const note = h("span", { class: "muted copy-note", role: "status" });
  const copy = h(
    "button",
    {
      type: "button",
      class: "btn",
      "aria-label": `Copy ${label.toLowerCase()}`,
      onClick: async () => {
        input.select();
        try {
          await navigator.clipboard.writeText(value);
          note.textContent = "Copied.";
        } catch {
          note.textContent = "Selected: press Ctrl+C to copy.";
        }
      },
    },
    icon("copy"),
    "Copy",
  );
  return h("div", { class: "field" }, h("label", { for: id, class: "label", text: label }), h("div", { class: "input-row hosts-copy" }, input, copy), note);
}

function addressText(host) {
  if (!host.address) return null;
  const port = host.port && host.port !== 22 ? `:${host.port}` : "";
  return `${host.user ? `${host.user}@` : ""}${host.address}${port}`;
}

// --- the table's cells -----------------------------------------------------------------------------

function lastContactCell(host) {
  if (!host.last_contact) return h("span", { class: "muted", dataset: { contact: "never" }, text: "never" });
  return h("span", { title: dateTime(host.last_contact), dataset: { contact: host.last_contact }, text: ago(secondsSince(host.last_contact)) });
}

function assetsCell(host, ctx) {
  const assets = host.assets || [];
  if (!assets.length) {
    const why = host.kind === "client" ? "none" : host.trusted ? "none yet" : "none until the key is trusted";
    return h("span", { class: "muted", text: why });
  }
  return h(
    "ul",
    { class: "hosts-assets" },
    assets.map((asset) => {
      const newest = ctx.newest[asset];
      let when;
      if (newest === undefined) when = h("span", { class: "muted small", text: "" });
      else if (newest === null) when = h("span", { class: "muted small", dataset: { point: "none" }, text: "no point yet" });
      else when = h("span", { class: "small", title: dateTime(newest.created_at), dataset: { point: newest.id }, text: `last point ${ago(secondsSince(newest.created_at))}` });
      return h("li", { dataset: { asset } }, h("a", { href: `#/points?asset=${enc(asset)}`, text: asset }), " ", when);
    }),
  );
}

function stateCell(host, ctx) {
  const parts = [];
  const job = ctx.running[host.name];
  if (host.kind === "client") {
    parts.push(host.last_contact ? pill("In contact", "good") : pill("Waiting for the client", "neutral"));
  } else if (!host.trusted) {
    parts.push(pill("Key not trusted yet", "warn"));
  } else {
    parts.push(pill("Trusted", "good"));
  }
  if (job) parts.push(h("span", { class: "small" }, pill("Backing up", "info"), " ", h("a", { href: `#/jobs/${enc(job)}`, text: "its job" })));
  if (host.last_error) parts.push(h("span", { class: "small error-text", dataset: { error: "" }, text: sentence(host.last_error) }));
  const waiting = (host.restores || []).filter((r) => r.state === "waiting");
  if (waiting.length) parts.push(h("span", { class: "small", text: `${capitalise(count(waiting.length, "restore"))} waiting for the client (appliance-client restore)` }));
  return h("span", { class: "stack", dataset: { state: host.kind === "client" ? "client" : host.trusted ? "trusted" : "untrusted" } }, parts);
}

function actionsCell(host, ctx) {
  const acts = [];
  const pulled = host.kind !== "client";
  if (ctx.canOperate && pulled && host.trusted) {
    acts.push(button("Back up now", { iconName: "play", kind: "small", "aria-label": `Back up ${host.name} now`, onClick: (e) => backupNow(host, e.currentTarget, ctx) }));
  }
  if (ctx.isAdmin && pulled && !host.trusted && host.offered_fingerprint) {
    acts.push(button("Trust key…", { iconName: "key", kind: "small", "aria-label": `Check and trust ${host.name}'s host key`, onClick: () => trustDialog(host, ctx.applianceKey, ctx) }));
  }
  if (host.kind === "libvirt" && host.trusted) {
    acts.push(button("VMs…", { kind: "small", "aria-label": `Virtual machines on ${host.name}`, onClick: () => vmsDialog(host, ctx) }));
  }
  if (ctx.canOperate && host.kind === "client" && (host.assets || []).length) {
    acts.push(button("Restore…", { iconName: "restore", kind: "small", "aria-label": `Restore files to ${host.name}`, onClick: () => restoreDialog(host, ctx) }));
  }
  if (ctx.isAdmin) {
    acts.push(h("button", { type: "button", class: "btn btn-small btn-danger", "aria-label": `Remove ${host.name}`, onClick: () => removeHost(host, ctx) }, icon("trash"), h("span", { text: "Remove" })));
  }
  return h("div", { class: "row-actions" }, acts);
}

function hostsTable(hosts, ctx) {
  return table(
    [
      { label: "Host", cell: (host) => h("strong", { text: host.name }) },
      { label: "Kind", cell: (host) => KIND_NAMES[host.kind] || host.kind },
      { label: "Address", className: "hide-md", cell: (host) => (addressText(host) ? h("span", { class: "mono small", text: addressText(host) }) : h("span", { class: "muted", text: "—" })) },
      { label: "Assets", cell: (host) => assetsCell(host, ctx) },
      { label: "Last contact", cell: (host) => lastContactCell(host) },
      { label: "State", cell: (host) => stateCell(host, ctx) },
      { label: "Actions", className: "actions", cell: (host) => actionsCell(host, ctx) },
    ],
    hosts,
    { caption: "Hosts", rowAttrs: (host) => ({ dataset: { host: host.name, kind: host.kind } }) },
  );
}

// --- actions ---------------------------------------------------------------------------------------

async function backupNow(host, btn, ctx) {
  const jobs = await busy(btn, ctx.banner, () => api.post(`/api/hosts/${enc(host.name)}/backup`, {}));
  if (!jobs) return;
  if (!jobs.length) {
    toast(`${host.name} has no asset to back up yet.`, { kind: "error" });
    return;
  }
  ctx.running[host.name] = jobs[0].id;
  ctx.watch(host.name, jobs.map((j) => j.id));
  toast(`Backup of ${host.name} started (${count(jobs.length, "job")}).`, { link: { href: `#/jobs/${enc(jobs[0].id)}`, text: "Watch progress" } });
  ctx.draw();
}

function removeHost(host, ctx) {
  const what =
    host.kind === "client"
      ? "Its client's token is revoked at once and the client can no longer send points."
      : "The appliance stops pulling from it.";
  confirmDialog({
    title: `Remove ${host.name}?`,
    text: `${what} Its assets and recovery points stay; delete them under Assets & policies if they are no longer needed.`,
    confirmLabel: "Remove host",
    action: async () => {
      await api.del(`/api/hosts/${enc(host.name)}`);
      toast(`${host.name} removed.`);
      await ctx.reload();
    },
  });
}

/** After adding a client host: the install command, once. */
function clientAddedDialog(answer) {
  formDialog({
    title: `Install the client on ${answer.host.name}`,
    wide: true,
    submitLabel: "Done",
    body: h(
      "div",
      { class: "hosts-install", dataset: { installFor: answer.host.name } },
      h("div", { class: "banner banner-warning", role: "note" }, icon("alert", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: "The token is shown only now." }), " Copy the command before closing this dialog; to get a new token, remove the host and add it again.")),
      h("p", { text: `Run this as root on ${answer.host.name}. It downloads the client from this appliance over the pinned certificate and enrolls it; then back up with “appliance-client backup PATH --asset ${(answer.host.assets || [answer.host.name])[0]}”.` }),
      (answer.host.assets || []).length > 1
        ? h("p", { text: `Block devices go to ${answer.host.assets[1]}: “appliance-client backup /dev/DEVICE” (a snapshot of it, for a disk in use).` })
        : null,
      // Without TLS the appliance answers a comment instead of a command: say it, keep the token.
      String(answer.install_command || "").startsWith("#")
        ? h("p", { class: "warn-text", text: sentence(answer.install_command.replace(/^#\s*/, "")) })
        : copyBox({ label: "Install command", value: answer.install_command, rows: 7, dataName: "installCommand" }),
      copyBox({ label: "Token", value: answer.token, dataName: "token" }),
    ),
    onSubmit: async () => {},
  }).dialog.querySelector(".dialog-foot .btn:not(.btn-primary)").remove();
}

/** Show the appliance's key for authorized_keys and the offered host key; "Trust this key". */
function trustDialog(host, applianceKey, ctx) {
  const fingerprint = host.offered_fingerprint;
  const where = host.user && host.user !== "root" ? `~${host.user}/.ssh/authorized_keys` : "/root/.ssh/authorized_keys";
  formDialog({
    title: `Trust ${host.name}'s host key`,
    wide: true,
    submitLabel: "Trust this key",
    body: h(
      "div",
      { class: "hosts-trust", dataset: { trustFor: host.name } },
      h("h3", { class: "hosts-step", text: "1. Let the appliance log in" }),
      h("p", { text: `Add this line to ${where} on ${host.address}:` }),
      applianceKey ? copyBox({ label: "The appliance's public key", value: applianceKey, rows: 3, dataName: "applianceKey" }) : h("p", { class: "muted", text: "The appliance's key could not be read; reload the page." }),
      h("h3", { class: "hosts-step", text: "2. Compare the host key" }),
      h("p", { text: `${addressText(host)} offered this host key. On the host, “ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub” (or the key type it uses) prints its fingerprint: trust it only if they are the same.` }),
      h("p", { class: "hosts-fingerprint" }, h("span", { class: "label", text: "Offered fingerprint" }), h("code", { class: "mono", dataset: { offeredFingerprint: "" }, text: fingerprint })),
      h("p", { class: "muted small", text: "Nothing is read from the host until its key is trusted; a different key later stops its backups." }),
    ),
    onSubmit: async () => {
      const trusted = await api.post(`/api/hosts/${enc(host.name)}/trust`, { fingerprint });
      const assets = trusted.assets || [];
      toast(`${host.name}'s key is trusted.${assets.length ? ` ${capitalise(count(assets.length, "asset"))}: ${assets.join(", ")}.` : ""}`);
      await ctx.reload();
    },
  });
}

function addDialog(ctx) {
  const kinds = [
    ["client", "Backup client", "Install appliance-client on a Linux host; it sends its backups here."],
    ["ssh", "SSH (agentless)", "Nothing to install: the appliance pulls folders over SSH."],
    ["libvirt", "KVM/libvirt host", "Protect the VMs of a libvirt host, reached over SSH."],
  ];
  const radios = h(
    "fieldset",
    { class: "field radios hosts-kinds" },
    h("legend", { class: "label", text: "Kind of host" }),
    kinds.map(([value, label, help]) => h("label", { class: "radio" }, h("input", { type: "radio", name: "kind", value, checked: value === "client" }), h("span", h("strong", { text: label }), h("small", { class: "muted", text: help })))),
  );
  const clientPart = h(
    "div",
    field({ label: "Asset", name: "asset", placeholder: "the host's name", autocomplete: "off", help: "The asset the client's token may add points to (empty: named like the host)." }),
    h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "disks" }), h("span", { text: "Also its block devices (whole disks, kept as a VM)" })),
  );
  const sshPart = h(
    "div",
    h(
      "div",
      { class: "grid-3" },
      field({ label: "Address", name: "address", placeholder: "web2.example or 192.0.2.10", autocomplete: "off", spellcheck: "false" }),
      field({ label: "Port", name: "port", type: "number", min: 1, max: 65535, value: 22 }),
      field({ label: "User", name: "user", value: "root", autocomplete: "off", spellcheck: "false" }),
    ),
  );
  const foldersPart = h(
    "div",
    field({ label: "Folders", help: "One absolute path per line; each folder becomes an asset once the key is trusted.", control: h("textarea", { name: "paths", rows: 3, placeholder: "/srv/www\n/etc" }) }),
    field({ label: "Excludes", help: "One pattern per line, e.g. *.tmp or /srv/www/cache (optional).", control: h("textarea", { name: "excludes", rows: 2 }) }),
    h("label", { class: "fo-check" }, h("input", { type: "checkbox", name: "one_file_system" }), h("span", { text: "Stay on one file system (do not cross mount points)" })),
  );
  const show = (kind) => {
    setApplies(clientPart, kind === "client");
    setApplies(sshPart, kind !== "client");
    setApplies(foldersPart, kind === "ssh");
  };
  show("client");
  radios.addEventListener("change", (e) => show(e.target.value));
  formDialog({
    title: "Add a host",
    wide: true,
    submitLabel: "Add host",
    body: h(
      "div",
      field({ label: "Name", name: "name", required: true, placeholder: "web1", autocomplete: "off", spellcheck: "false", help: "Lower-case letters, digits, dots and dashes." }),
      radios,
      clientPart,
      sshPart,
      foldersPart,
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      const kind = el.kind.value;
      const body = { name: el.name.value.trim(), kind };
      if (kind === "client") {
        if (el.asset.value.trim()) body.asset = el.asset.value.trim();
        body.disks = el.disks.checked;
      } else {
        body.address = el.address.value.trim();
        body.port = Number(el.port.value || 22);
        body.user = el.user.value.trim() || "root";
      }
      if (kind === "ssh") {
        body.paths = lines(el.paths.value);
        body.excludes = lines(el.excludes.value);
        body.one_file_system = el.one_file_system.checked;
      }
      const answer = await api.post("/api/hosts", body);
      await ctx.reload();
      // the next step opens once this dialog has closed
      setTimeout(() => {
        if (kind === "client") clientAddedDialog(answer);
        else trustDialog({ ...answer.host, offered_fingerprint: answer.offered_fingerprint }, answer.appliance_key || ctx.applianceKey, ctx);
      }, 0);
    },
  });
}

/** A restore of one of a client host's points, pulled by the host's client. */
async function restoreDialog(host, ctx) {
  let points = [];
  try {
    const lists = await Promise.all((host.assets || []).map((asset) => api.get(`/api/points?asset=${enc(asset)}&limit=50`)));
    // The client pulls files; disk points are downloaded or failed over instead.
    points = lists.flat().filter((p) => p.kind === "files").sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
  } catch (err) {
    ctx.banner.error(err);
    return;
  }
  if (!points.length) {
    toast(`${host.name} has no recovery point yet.`, { kind: "error" });
    return;
  }
  formDialog({
    title: `Restore to ${host.name}`,
    description: `The restore waits here for a day; on ${host.name}, “appliance-client restore” fetches it and writes the files into the target folder.`,
    submitLabel: "Start restore",
    body: h(
      "div",
      field({ label: "Point", control: select("point", points.map((p) => [p.id, `${p.asset} · ${dateTime(p.created_at)}`]), points[0].id) }),
      field({ label: "Folder or file in the point", name: "path", placeholder: "empty: the whole point", autocomplete: "off", spellcheck: "false" }),
      field({ label: "Target folder on the host", name: "target", required: true, placeholder: "/srv/restore", autocomplete: "off", spellcheck: "false", help: "An absolute folder on the host." }),
    ),
    onSubmit: async (form) => {
      const el = form.elements;
      await api.post(`/api/hosts/${enc(host.name)}/restores`, { point: el.point.value, path: el.path.value.trim(), target: el.target.value.trim() });
      toast(`Restore waiting for ${host.name}: run “appliance-client restore” there.`, { timeout: 12000 });
      await ctx.reload();
    },
  });
}

// --- VMs of a libvirt host -------------------------------------------------------------------------

function vmRow(host, vm, ctx, redraw) {
  const name = vm.name || vm.domain;
  const protectedAs = vm.asset && vm.protected !== false ? vm.asset : null;
  const live = vm.live_backup !== false;
  const allow = h("input", { type: "checkbox", "aria-label": `Allow the offline backup of ${name} (shut down, copy, start)` });
  const parts = [
    h("strong", { text: name }),
    vm.state ? h("span", { class: "muted small", text: ` ${vm.state}` }) : null,
  ];
  let action = null;
  if (protectedAs) action = h("span", { class: "small" }, pill("Protected", "good"), " as ", h("a", { href: `#/points?asset=${enc(protectedAs)}`, text: protectedAs }));
  else if (ctx.isAdmin) {
    action = button("Protect", {
      kind: "small",
      "aria-label": `Protect ${name}`,
      onClick: async (e) => {
        const done = await busy(e.currentTarget, ctx.vmBanner, () => api.post(`/api/hosts/${enc(host.name)}/vms`, { domain: name, allow_offline: allow.checked }));
        if (done === undefined) return;
        toast(`${name} is protected.`);
        await redraw();
        await ctx.reload();
      },
    });
  }
  return h(
    "li",
    { class: "hosts-vm", dataset: { vm: name } },
    h("div", parts),
    live ? null : h("p", { class: "small warn-text", text: sentence(vm.reason || "This VM cannot be backed up while it runs") }),
    !live && !protectedAs && ctx.isAdmin ? h("label", { class: "fo-check small" }, allow, h("span", { text: "Allow the offline backup: shut the VM down, copy its disks, start it again" })) : null,
    action,
  );
}

function vmsDialog(host, ctx) {
  const box = h("div", { class: "hosts-vms" }, loading("Asking the host for its VMs…"));
  const { banner } = formDialog({
    title: `Virtual machines on ${host.name}`,
    wide: true,
    submitLabel: "Close",
    body: box,
    onSubmit: async () => {},
  });
  ctx.vmBanner = banner;
  const redraw = async () => {
    let vms;
    try {
      vms = await api.get(`/api/hosts/${enc(host.name)}/vms`);
    } catch (err) {
      replace(box);
      banner.error(err);
      return;
    }
    const list = Array.isArray(vms) ? vms : vms.vms || [];
    replace(box, list.length ? h("ul", { class: "hosts-vm-list" }, list.map((vm) => vmRow(host, vm, ctx, redraw))) : h("p", { class: "muted", text: `libvirt on ${host.name} has no VM defined.` }));
  };
  redraw();
}

// --- the screen ------------------------------------------------------------------------------------

export default async function hostsView(view) {
  const body = h("div", loading());
  const keyBox = h("div");
  let hosts = [];
  let timer = null;
  let stopped = false;
  const watched = new Map(); // host -> job ids still running that were started here
  const ctx = {
    isAdmin: view.can("admin"),
    canOperate: view.can("operator"),
    banner: view.banner,
    applianceKey: null,
    newest: {},
    running: {},
    vmBanner: null,
    watch(name, ids) {
      watched.set(name, ids);
      schedule();
    },
    draw: () => draw(),
    async reload() {
      clearTimeout(timer);
      try {
        hosts = await api.get("/api/hosts");
      } catch (err) {
        view.banner.error(err);
      }
      await refreshJobs();
      await refreshPoints();
      draw();
      schedule();
    },
  };
  async function refreshJobs() {
    for (const [name, ids] of [...watched]) {
      const states = await Promise.all(ids.map((id) => api.get(`/api/jobs/${enc(id)}`).then((j) => j.state, () => "unknown")));
      const left = ids.filter((id, i) => ["queued", "running", "waiting"].includes(states[i]));
      if (left.length) {
        watched.set(name, left);
        ctx.running[name] = left[0];
      } else {
        watched.delete(name);
        delete ctx.running[name];
      }
    }
  }
  async function refreshPoints() {
    const assets = [...new Set(hosts.flatMap((host) => host.assets || []))];
    const answers = await Promise.all(assets.map((asset) => api.get(`/api/points?asset=${enc(asset)}&limit=1`).then((list) => (list && list.length ? list[0] : null), () => undefined)));
    ctx.newest = Object.fromEntries(assets.map((asset, i) => [asset, answers[i]]));
  }
  const add = ctx.isAdmin ? button("Add a host", { iconName: "plus", kind: "primary", onClick: () => addDialog(ctx) }) : null;
  function draw() {
    replace(
      body,
      hosts.length
        ? card("Hosts", { className: "hosts-card" }, hostsTable(hosts, ctx))
        : emptyState("disk", "No host yet", "Add a Linux host with the backup client, a host the appliance pulls over SSH, or a KVM/libvirt host whose VMs it protects.", ...(add ? [button("Add a host", { iconName: "plus", onClick: () => addDialog(ctx) })] : [])),
    );
  }
  function schedule() {
    if (stopped) return;
    clearTimeout(timer);
    timer = setTimeout(() => ctx.reload().catch(() => {}), watched.size ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }
  view.onDispose(() => {
    stopped = true;
    clearTimeout(timer);
  });
  replace(
    view.el,
    pageHeader("Hosts", "The machines on the network that this appliance backs up: with the backup client, over SSH, or the VMs of a KVM/libvirt host.", ...(add ? [add] : [])),
    body,
    keyBox,
  );
  api
    .get("/api/hosts/ssh-key")
    .then((key) => {
      ctx.applianceKey = key.public_key;
      replace(
        keyBox,
        card(
          "This appliance's SSH key",
          { className: "hosts-key", subtitle: `For authorized_keys on SSH and libvirt hosts · fingerprint ${key.fingerprint}` },
          h("div", { class: "card-body" }, copyBox({ label: "Public key", value: key.public_key, rows: 2 })),
        ),
      );
    })
    .catch(() => {});
  await ctx.reload();
}
