// First run (create the administrator) and signing in.

import { api } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { bannerSlot, field, markField } from "../ui.js";
import { renderWizardPage } from "./firstrun.js";

function authCard(title, subtitle, banner, form) {
  return h(
    "div",
    { class: "auth" },
    h(
      "div",
      { class: "auth-card" },
      h("div", { class: "auth-brand" }, h("span", { class: "brand-mark" }, icon("shield")), h("span", { text: "Backup appliance" })),
      h("h1", { text: title }),
      subtitle ? h("p", { class: "muted", text: subtitle }) : null,
      banner.el,
      form,
    ),
  );
}

async function submitting(form, banner, action) {
  const submit = form.querySelector("button[type=submit]");
  banner.hide();
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  submit.disabled = true;
  submit.classList.add("busy");
  try {
    await action();
  } catch (err) {
    const { field: name } = banner.error(err);
    markField(form, name);
  } finally {
    submit.disabled = false;
    submit.classList.remove("busy");
  }
}

export function renderLogin(root, { notice = null, onSignedIn }) {
  const banner = bannerSlot();
  if (notice) banner.show(notice.kind || "info", notice.title, notice.text || "");
  const form = h(
    "form",
    { class: "form", novalidate: true },
    field({ label: "User name", name: "name", autocomplete: "username", required: true, autocapitalize: "off", spellcheck: "false" }),
    field({ label: "Password", name: "password", type: "password", autocomplete: "current-password", required: true }),
    h("button", { type: "submit", class: "btn btn-primary btn-block", text: "Sign in" }),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = form.elements.name.value.trim();
    const password = form.elements.password.value;
    if (!name || !password) {
      banner.show("error", "Please fill in both fields.", "Give your user name and password.");
      markField(form, name ? "password" : "name");
      return;
    }
    submitting(form, banner, async () => {
      const session = await api.post("/api/login", { name, password }, { quietAuth: true });
      await onSignedIn(session);
    });
  });
  replace(root, authCard("Sign in", "Sign in to manage backups and restores.", banner, form));
  form.elements.name.focus();
}

export function renderFirstRun(root, { codeRequired, codeFile, onSignedIn }) {
  const banner = bannerSlot();
  const form = h(
    "form",
    { class: "form", novalidate: true },
    field({ label: "Administrator name", name: "name", value: "admin", autocomplete: "username", required: true, help: "Letters, digits, dots, dashes and underscores." }),
    field({ label: "Password", name: "password", type: "password", autocomplete: "new-password", required: true, help: "At least 8 characters." }),
    field({ label: "Repeat the password", name: "password2", type: "password", autocomplete: "new-password", required: true }),
    codeRequired
      ? field({ label: "Set-up code", name: "setup_code", required: true, autocomplete: "off", help: `Printed on the appliance's console and in its log when the service started, and kept in ${codeFile || "<data>/secrets/setup-code"} (readable by root only). It proves you may set up this appliance.` })
      : null,
    h("button", { type: "submit", class: "btn btn-primary btn-block", text: "Create administrator" }),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = form.elements.name.value.trim();
    const password = form.elements.password.value;
    if (password !== form.elements.password2.value) {
      banner.show("error", "The passwords differ.", "Type the same password twice.");
      markField(form, "password2");
      return;
    }
    submitting(form, banner, async () => {
      const body = { name, password };
      if (codeRequired) body.setup_code = form.elements.setup_code.value.trim();
      await api.post("/api/setup", body, { quietAuth: true });
      const session = await api.post("/api/login", { name, password }, { quietAuth: true });
      // the recovery key, network, time and first pool before the dashboard (views/firstrun.js)
      renderWizardPage(root, { onDone: () => onSignedIn(session) });
    });
  });
  replace(
    root,
    authCard(
      "Welcome to your backup appliance",
      "No administrator exists yet. Create the first one: this account can add users, protect folders and virtual machines, and restore them.",
      banner,
      form,
    ),
  );
  form.elements.password.focus();
}
