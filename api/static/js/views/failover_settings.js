// One VM's failover settings: how its boot is proven, and the network it gets when it is failed
// over (isolated, NAT with forwarded ports, or bridged onto a bridge of the appliance). Reached
// from the VM's row under Assets & policies and from a failover session's screen.
// Everyone may read them; only an administrator saves them (PUT /api/assets/{name}/failover-settings).

import { ApiError, api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { button, card, field, loading, pageHeader, toast } from "../ui.js";
import { networkPicker, networkText } from "./network_picker.js";

function numberOrNull(form, name, { min, max, integer = true }) {
  const input = form.elements[name];
  const text = input.value.trim();
  if (!text) return null;
  const value = Number(text);
  if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    throw new ApiError(400, "invalid_input", `${input.dataset.what} must be a number from ${min} to ${max}`, { field: name });
  }
  return value;
}

function proofFromForm(form) {
  const proof = {};
  const text = (name) => form.elements[name].value.trim();
  if (text("serial")) proof.serial = text("serial");
  const http = numberOrNull(form, "http_port", { min: 1, max: 65535 });
  if (http !== null) {
    proof.http_port = http;
    proof.http_path = text("http_path") || "/";
    if (text("http_expect")) proof.http_expect = text("http_expect");
  }
  const tcp = numberOrNull(form, "tcp", { min: 1, max: 65535 });
  if (tcp !== null) proof.tcp = tcp;
  if (form.elements.agent.checked) proof.agent = true;
  const stable = numberOrNull(form, "screen_stable", { min: 1, max: 600, integer: false });
  if (stable !== null) proof.screen_stable = stable;
  const timeout = numberOrNull(form, "timeout", { min: 10, max: 3600, integer: false });
  if (timeout !== null) proof.timeout = timeout;
  if (text("address")) proof.address = text("address");
  return proof;
}

export default async function failoverSettings(view) {
  const [name] = view.params;
  replace(view.el, loading());
  let stored;
  try {
    stored = await api.get(`/api/assets/${enc(name)}/failover-settings`);
  } catch (err) {
    replace(view.el, pageHeader("Failover settings"), h("p", h("a", { href: "#/assets", text: "Back to assets" })));
    view.banner.error(err);
    return;
  }
  view.setTitle(`Failover settings of ${name}`);
  const admin = view.can("admin");
  const p = stored.proof || {};
  const num = (v) => (v === null || v === undefined ? "" : String(v));
  const input = (nameAttr, what, value, attrs = {}) => ({ name: nameAttr, value, "data-what": what, disabled: !admin, ...attrs });

  const proofPart = h(
    "div",
    { class: "card-body fs-proof" },
    h("p", { class: "help", text: "Every check you fill in must pass before the boot counts as proven. With none, the VM counts as booted once its screen stops changing for 5 seconds." }),
    field({ label: "The serial console prints", help: "A word or pattern the VM prints when it is up, e.g. “login:”.", ...input("serial", "The serial pattern", p.serial || "", { placeholder: "login:" }) }),
    h(
      "div",
      { class: "grid-2" },
      field({ label: "A web page answers on VM port", help: "Reached through a forwarded port (or the VM's address when bridged).", ...input("http_port", "The web port", num(p.http_port), { inputmode: "numeric", placeholder: "80" }) }),
      field({ label: "Web page path", ...input("http_path", "The path", p.http_path || "/") }),
    ),
    h(
      "div",
      { class: "grid-2" },
      field({ label: "The page contains", ...input("http_expect", "The expected text", p.http_expect || "", { placeholder: "OK" }) }),
      field({ label: "A TCP port accepts connections", ...input("tcp", "The TCP port", num(p.tcp), { inputmode: "numeric", placeholder: "22" }) }),
    ),
    h(
      "div",
      { class: "grid-2" },
      field({ label: "The screen stays still for (seconds)", ...input("screen_stable", "The still-screen time", num(p.screen_stable), { inputmode: "decimal" }) }),
      field({ label: "Give up after (seconds)", ...input("timeout", "The time limit", num(p.timeout ?? 180), { inputmode: "decimal" }) }),
    ),
    h("label", { class: "fo-check field" }, h("input", { type: "checkbox", name: "agent", checked: Boolean(p.agent), disabled: !admin }), h("span", "The QEMU guest agent in the VM answers")),
    field({ label: "The VM's address on your LAN (bridged only)", help: "Where the web and TCP checks reach a bridged VM, e.g. 192.168.1.20.", ...input("address", "The address", p.address || "") }),
  );

  const picker = networkPicker(name, { purpose: "settings", initial: stored.network });
  if (!admin) for (const control of picker.element.querySelectorAll("input, select, button")) control.disabled = true;
  const networkNow = h("p", { class: "muted small fs-network-now", text: `Saved now: ${networkText(stored.network)}.` });
  const networkPart = h("div", { class: "card-body fs-network" }, networkNow, picker.element, h("p", { class: "help", text: "A boot test always runs isolated, whatever you choose here." }));

  const save = button("Save settings", { kind: "primary", type: "submit", disabled: !admin });
  const note = admin ? null : h("p", { class: "help", text: "Only an administrator can change these settings." });
  const form = h(
    "form",
    { class: "fs-form", novalidate: true },
    card("How a boot is proven", { subtitle: "What must be true before the appliance says the VM is up and measures its recovery time" }, proofPart),
    card("Network", { subtitle: "What the VM is connected to when it is failed over" }, networkPart),
    h("div", { class: "fs-actions" }, save, note),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    view.banner.hide();
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    save.disabled = true;
    try {
      const body = { proof: proofFromForm(form), network: picker.value() };
      stored = await api.put(`/api/assets/${enc(name)}/failover-settings`, body);
      networkNow.textContent = `Saved now: ${networkText(stored.network)}.`;
      toast(`Saved the failover settings of ${name}.`);
    } catch (err) {
      const { field: bad } = view.banner.error(err) || {};
      const target = bad && form.querySelector(`[name="${CSS.escape(bad)}"]`);
      if (target) {
        target.setAttribute("aria-invalid", "true");
        target.focus();
      }
    } finally {
      save.disabled = !admin;
    }
  });

  replace(
    view.el,
    pageHeader(`Failover settings of ${name}`, "How this VM's boot is proven and what network it gets when it runs from its backup.", button("Back to assets", { href: "#/assets", kind: "small" })),
    form,
  );
}
