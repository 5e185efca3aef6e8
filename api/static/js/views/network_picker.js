// The network a VM gets when it is failed over: isolated, NAT with port forwards, or bridged onto
// a LAN bridge of the appliance. Used by the fail-over dialog and the failover settings screen.
//
// networkPicker(asset, {purpose}) returns {element, value()}:
// - purpose "failover": the first choice is "As configured for this VM"; value() is null for it,
//   else the `network` object of a fail-over request.
// - purpose "settings": value() is always the network object to store (no "as configured").
// - purpose "boot_test": a boot test always runs isolated; the picker only says so and value()
//   is null.
// value() throws an ApiError (code invalid_input, with the field) when a port forward is not a
// port number, so a formDialog shows it beside the field. The bridges come from
// GET /api/network/bridges; without any, "Bridged" is offered disabled with the reason.

import { ApiError, api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { count, listText } from "../format.js";
import { button, field, select } from "../ui.js";

export const NETWORK_MODES = {
  isolated: ["Isolated", "The VM reaches nothing. Only the ports you forward reach it, from the appliance itself (127.0.0.1). Safe for tests."],
  nat: ["NAT", "The VM can reach out through the appliance (the internet, your LAN). Ports you forward reach it on the appliance's address you choose."],
  bridged: ["Bridged", "The VM joins your LAN through a bridge of the appliance, with its original network card address, as it ran before. For a real outage."],
};

/** A network setting in one sentence, for a non-expert owner. */
export function networkText(network) {
  const n = network || {};
  const forwards = n.port_forwards || [];
  const fwText = forwards.length ? `; ${count(forwards.length, "forwarded port")} (${listText(forwards.map((f) => forwardText(f, n.address)))})` : "";
  if (n.mode === "bridged") return `Bridged onto ${n.bridge}`;
  if (n.mode === "nat") return `NAT through the appliance${fwText}`;
  return `Isolated${fwText || ": nothing reaches the VM"}`;
}

function forwardText(f, address) {
  const pair = Array.isArray(f) ? { host: f[0], guest: f[1] } : f;
  const host = pair.host ? `${address || "127.0.0.1"}:${pair.host}` : "a free port";
  return `${host} → guest port ${pair.guest}`;
}

let pickerSeq = 0;

function forwardRow(host, guest, onRemove) {
  const hostInput = h("input", { type: "text", inputmode: "numeric", name: "forward_host", class: "np-port", value: host ? String(host) : "", placeholder: "any free", "aria-label": "Port on the appliance (empty: any free port)" });
  const guestInput = h("input", { type: "text", inputmode: "numeric", name: "forward_guest", class: "np-port", value: guest ? String(guest) : "", placeholder: "80", "aria-label": "Port in the VM" });
  const row = h(
    "li",
    { class: "np-forward" },
    h("span", { class: "muted small", text: "appliance port" }),
    hostInput,
    h("span", { "aria-hidden": "true", text: "→" }),
    h("span", { class: "muted small", text: "VM port" }),
    guestInput,
    button("Remove", { kind: "small", "aria-label": "Remove this forward", onClick: () => onRemove(row) }),
  );
  row.ports = { hostInput, guestInput };
  return row;
}

function portValue(input, { allowEmpty }) {
  const text = input.value.trim();
  if (!text && allowEmpty) return 0;
  const port = Number(text);
  if (!/^\d+$/.test(text) || port < 1 || port > 65535) {
    input.setAttribute("aria-invalid", "true");
    throw new ApiError(400, "invalid_input", `“${text || "nothing"}” is not a port: give a number from 1 to 65535`, { field: input.name });
  }
  input.removeAttribute("aria-invalid");
  return port;
}

/**
 * The picker. asset: the VM's name (or an asset object with .name); initial: a stored network
 * to start from (settings); purpose: "failover", "boot_test" or "settings".
 */
export function networkPicker(asset, { purpose = "failover", initial = null } = {}) {
  const name = typeof asset === "string" ? asset : asset.name;
  const id = `np-${++pickerSeq}`;
  if (purpose === "boot_test") {
    const element = h("div", { class: "np np-boot-test", dataset: { purpose } }, h("p", { class: "help", text: "A boot test always runs isolated: the VM reaches nothing and never joins a bridge, even when its failovers are set to bridged." }));
    return { element, value: () => null };
  }
  const start = initial || {};
  const modes = purpose === "failover" ? ["configured", "isolated", "nat", "bridged"] : ["isolated", "nat", "bridged"];
  let mode = purpose === "failover" ? "configured" : start.mode || "isolated";
  const configuredNote = h("small", { class: "muted", text: "Loading…" });
  const labels = {
    configured: ["As set for this VM", configuredNote],
    ...Object.fromEntries(Object.entries(NETWORK_MODES).map(([k, [label, help]]) => [k, [label, h("small", { class: "muted", text: help })]])),
  };
  const bridgedNote = h("small", { class: "np-bridged-note error-text", hidden: true });
  const radios = h(
    "fieldset",
    { class: "field radios np-modes" },
    h("legend", { class: "label", text: "Network" }),
    modes.map((value) =>
      h(
        "label",
        { class: "radio" },
        h("input", { type: "radio", name: `${id}-mode`, value, checked: value === mode }),
        h("span", h("strong", { text: labels[value][0] }), labels[value][1], value === "bridged" ? bridgedNote : null),
      ),
    ),
  );

  const bridgeSelect = select("bridge", [], "", { disabled: true });
  const bridgeInfo = h("p", { class: "help np-bridge-info" });
  const bridgePart = h("div", { class: "np-bridge" }, field({ label: "Bridge", control: bridgeSelect }), bridgeInfo);

  const addressSelect = select("forward_address", [["127.0.0.1", "127.0.0.1 (this appliance only)"]], start.address || "127.0.0.1");
  const addressPart = field({ label: "Forwarded ports listen on", control: addressSelect, help: "The appliance's address where people reach the VM's forwarded ports." });

  const forwardList = h("ul", { class: "plain np-forwards" });
  const removeRow = (row) => row.remove();
  for (const f of start.port_forwards || []) {
    const pair = Array.isArray(f) ? { host: f[0], guest: f[1] } : f;
    forwardList.appendChild(forwardRow(pair.host, pair.guest, removeRow));
  }
  const addForward = button("Add a forwarded port", { kind: "small", onClick: () => forwardList.appendChild(forwardRow(0, "", removeRow)).querySelector("[name=forward_guest]").focus() });
  const forwardsPart = h("div", { class: "field np-forward-part" }, h("span", { class: "label", text: "Forwarded ports" }), h("p", { class: "help", text: "Only the ports listed here reach the VM from outside. Leave the appliance port empty to take any free one." }), forwardList, addForward);

  const element = h("div", { class: "np", dataset: { purpose } }, radios, bridgePart, addressPart, forwardsPart);
  let bridges = [];

  function show() {
    bridgePart.hidden = mode !== "bridged";
    addressPart.hidden = mode !== "nat";
    forwardsPart.hidden = !(mode === "isolated" || mode === "nat");
    element.dataset.mode = mode;
  }
  radios.addEventListener("change", (e) => {
    if (e.target.name !== `${id}-mode`) return;
    mode = e.target.value;
    show();
  });
  show();

  function drawBridges(found, error) {
    bridges = found;
    const bridgedRadio = radios.querySelector("input[value=bridged]");
    const wanted = start.mode === "bridged" ? start.bridge : null;
    const names = bridges.map((b) => b.name);
    if (wanted && !names.includes(wanted)) names.unshift(wanted);
    replace(bridgeSelect, names.map((n) => h("option", { value: n, selected: n === wanted, text: n })));
    bridgeSelect.disabled = !names.length;
    if (!bridges.length) {
      bridgedNote.hidden = false;
      bridgedNote.textContent = error ? `The appliance's bridges cannot be read: ${error}` : "This appliance has no network bridge, so a VM cannot join your LAN yet. Your administrator can set one up (e.g. br0).";
      if (bridgedRadio && mode !== "bridged") bridgedRadio.disabled = true;
    }
    const describe = () => {
      const b = bridges.find((x) => x.name === bridgeSelect.value);
      const allowed = b && b.helper_allowed === false ? ` VMs may not join it yet: your administrator adds “allow ${b.name}” to /etc/qemu/bridge.conf.` : "";
      bridgeInfo.textContent = b ? `${b.up ? "Up" : "Down"}; ${b.ports.length ? `linked to ${listText(b.ports.map((p) => p.name))}` : "no network port linked to it"}${b.addresses.length ? `; appliance address ${listText(b.addresses)}` : ""}.${allowed}` : wanted ? `There is no bridge ${wanted} on this appliance now.` : "";
    };
    bridgeSelect.addEventListener("change", describe);
    describe();
  }

  api
    .get("/api/network/bridges")
    .then((info) => {
      drawBridges(info.bridges || [], info.error);
      const have = new Set(["127.0.0.1"]);
      for (const a of info.addresses || []) {
        if (have.has(a.address)) continue;
        have.add(a.address);
        addressSelect.appendChild(h("option", { value: a.address, selected: a.address === start.address, text: `${a.address} (${a.interface})` }));
      }
    })
    .catch((err) => drawBridges([], err.status === 403 ? "only operators and administrators may see them" : err.message || String(err)));

  if (purpose === "failover") {
    api
      .get(`/api/assets/${enc(name)}/failover-settings`)
      .then((s) => {
        configuredNote.textContent = networkText(s.network);
      })
      .catch(() => {
        configuredNote.textContent = "The network set in this VM's failover settings.";
      });
  }

  function value() {
    if (mode === "configured") return null;
    const network = { mode };
    if (mode === "bridged") {
      if (!bridgeSelect.value) throw new ApiError(400, "bridge_missing", "there is no bridge on this appliance to join; choose Isolated or NAT", { field: "bridge" });
      network.bridge = bridgeSelect.value;
      return network;
    }
    network.port_forwards = [...forwardList.children].map((row) => ({ host: portValue(row.ports.hostInput, { allowEmpty: true }), guest: portValue(row.ports.guestInput, { allowEmpty: false }) }));
    if (mode === "nat") network.address = addressSelect.value;
    return network;
  }

  return { element, value };
}

const ADDRESS_SOURCES = {
  dhcp: "given by the appliance's built-in DHCP",
  agent: "reported by the guest agent in the VM",
  neighbours: "seen on your LAN (the appliance's neighbour table)",
};

/**
 * The rows a failover session's details show about its network: [label, value] pairs (value
 * null when there is nothing to say). `running`: the VM runs now, so its forwards listen.
 */
export function networkRows(info, running) {
  const d = info.details || {};
  const network = d.network || {};
  const a = info.addresses || null;
  const modeText = {
    isolated: "Isolated: the VM reaches nothing; only the forwarded ports reach it",
    nat: "NAT: the VM reaches out through the appliance; only the forwarded ports reach it",
    bridged: `Bridged onto ${network.bridge}, with the VM's own network card address`,
  }[network.mode];
  const note = d.network_note ? h("span", { class: "muted small block fo-network-note", text: `${d.network_note[0].toUpperCase()}${d.network_note.slice(1)}.` }) : null;
  let address = null;
  if (running && a) {
    address = a.guest_address ? h("span", h("span", { class: "mono", text: a.guest_address }), h("span", { class: "muted small block", text: ADDRESS_SOURCES[a.source] || "" })) : "Not known yet";
  }
  let fw = [];
  if (running && a) fw = (a.forwards || []).map((f) => `${f.address}:${f.host_port} → guest port ${f.guest_port}`);
  else if (running) {
    const where = network.mode === "nat" ? network.address || "127.0.0.1" : "127.0.0.1";
    fw = Object.entries(info.ports || {}).map(([guest, host]) => `${where}:${host} → guest port ${guest}`);
  }
  return [
    ["Network", modeText ? (note ? h("span", modeText, note) : modeText) : null],
    ["Address in the VM", address],
    ["Forwarded ports", fw.length ? h("ul", { class: "plain fo-forwards" }, fw.map((text) => h("li", { class: "mono", text }))) : null],
  ];
}
