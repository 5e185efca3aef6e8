// Shared pieces of the page: banners, toasts, dialogs, forms, tables, pills, progress bars.

import { api, humanError } from "./api.js";
import { clear, h, icon } from "./dom.js";

// --- banners (errors and notices at the top of a screen) -------------------------------------------

/** A banner slot; show(err) fills it with the error in words, notice(text) with a note. */
export function bannerSlot() {
  const el = h("div", { class: "banner-slot" });
  const slot = {
    el,
    error(err) {
      const { title, text } = humanError(err);
      this.show("error", title, text);
      return humanError(err);
    },
    notice(title, text = "") {
      this.show("info", title, text);
    },
    success(title, text = "") {
      this.show("success", title, text);
    },
    show(kind, title, text) {
      clear(el);
      el.appendChild(
        h(
          "div",
          { class: `banner banner-${kind}`, role: kind === "error" ? "alert" : "status" },
          icon(kind === "error" ? "alert" : kind === "success" ? "check" : "shield", "banner-icon"),
          h("div", { class: "banner-body" }, h("strong", { text: text && !/[.!?:]$/.test(title) ? `${title}.` : title }), text ? h("span", { text: ` ${text}` }) : null),
          h(
            "button",
            { class: "icon-btn banner-close", type: "button", "aria-label": "Dismiss", onClick: () => slot.hide() },
            icon("close"),
          ),
        ),
      );
    },
    hide() {
      clear(el);
    },
  };
  return slot;
}

// --- toasts -----------------------------------------------------------------------------------------

export function toast(text, { link = null, kind = "success", timeout = 6000 } = {}) {
  const box = document.getElementById("toasts");
  if (!box) return;
  const item = h(
    "div",
    { class: `toast toast-${kind}` },
    icon(kind === "error" ? "alert" : "check", "toast-icon"),
    h("span", { class: "toast-text", text }),
    link ? h("a", { href: link.href, class: "toast-link", text: link.text, onClick: () => item.remove() }) : null,
    h("button", { type: "button", class: "icon-btn", "aria-label": "Dismiss", onClick: () => item.remove() }, icon("close")),
  );
  box.appendChild(item);
  while (box.children.length > 3) box.firstChild.remove();
  if (timeout) setTimeout(() => item.remove(), timeout);
}

// --- dialogs ----------------------------------------------------------------------------------------

/**
 * A modal dialog with a form. fields: the form's body nodes. onSubmit(form, banner) returns a
 * promise; the dialog closes when it resolves (unless to false: a step that asks again, such as
 * a restore showing what it must first recall) and shows the error in words when it rejects.
 */
export function formDialog({ title, description = null, body, submitLabel = "Save", onSubmit, danger = false, wide = false }) {
  const banner = bannerSlot();
  const submit = h("button", { type: "submit", class: danger ? "btn btn-danger" : "btn btn-primary", text: submitLabel });
  const cancel = h("button", { type: "button", class: "btn", text: "Cancel" });
  const form = h(
    "form",
    { class: "dialog-form", novalidate: true },
    h(
      "header",
      { class: "dialog-head" },
      h("h2", { text: title, id: `dlg-${Math.random().toString(36).slice(2)}` }),
      h("button", { type: "button", class: "icon-btn", "aria-label": "Close", onClick: () => close() }, icon("close")),
    ),
    h("div", { class: "dialog-body" }, description ? h("p", { class: "muted", text: description }) : null, banner.el, body),
    h("footer", { class: "dialog-foot" }, cancel, submit),
  );
  const dialog = h("dialog", { class: wide ? "dialog dialog-wide" : "dialog", "aria-labelledby": form.querySelector("h2").id }, form);
  document.body.appendChild(dialog);
  const close = () => {
    window.removeEventListener("hashchange", close);
    if (dialog.open) dialog.close();
    dialog.remove();
  };
  // A dialog belongs to the screen it was opened on: going to another screen (a link, the back
  // button, a view that moves on by itself) closes it rather than leaving it over the new one.
  window.addEventListener("hashchange", close);
  cancel.addEventListener("click", close);
  dialog.addEventListener("cancel", (event) => {
    event.preventDefault();
    close();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    banner.hide();
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    submit.disabled = true;
    submit.classList.add("busy");
    try {
      if ((await onSubmit(form, banner)) !== false) close();
    } catch (err) {
      const { field } = banner.error(err);
      markField(form, field);
    } finally {
      submit.disabled = false;
      submit.classList.remove("busy");
    }
  });
  dialog.showModal();
  const first = form.querySelector(".dialog-body input:not([type=hidden]):not([readonly]), .dialog-body select, .dialog-body textarea");
  if (first) first.focus();
  return { dialog, form, close, banner };
}

export function markField(form, field) {
  if (!field) return;
  const input = form.querySelector(`[name="${CSS.escape(field)}"]`);
  if (input && input.offsetParent !== null) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

/** Ask before doing something that cannot be undone. Resolves when action() succeeded. */
export function confirmDialog({ title, text, confirmLabel, action, danger = true }) {
  return new Promise((resolve) => {
    formDialog({
      title,
      body: h("p", { text }),
      submitLabel: confirmLabel,
      danger,
      onSubmit: async () => {
        await action();
        resolve(true);
      },
    });
  });
}

/** A table row's trash-can button: asks first, then DELETEs `path`, says `deleted`, calls `done`. */
export function deleteButton({ label, title, text, confirmLabel, path, deleted, done }) {
  return h(
    "button",
    {
      type: "button",
      class: "icon-btn danger",
      title: "Delete",
      "aria-label": label,
      onClick: () =>
        confirmDialog({
          title,
          text,
          confirmLabel,
          action: async () => {
            await api.del(path);
            toast(deleted);
            done();
          },
        }),
    },
    icon("trash"),
  );
}

/** Show something once (a new API token): a read-only field with a copy button. */
export function revealDialog({ title, text, value, label }) {
  const input = h("input", { type: "text", readonly: true, value, class: "mono", id: "reveal-value", "aria-label": label });
  const copied = h("span", { class: "muted copy-note", role: "status" });
  const copy = h(
    "button",
    {
      type: "button",
      class: "btn",
      onClick: async () => {
        input.select();
        try {
          await navigator.clipboard.writeText(value);
          copied.textContent = "Copied.";
        } catch {
          copied.textContent = "Selected: press Ctrl+C to copy.";
        }
      },
    },
    icon("copy"),
    "Copy",
  );
  const { dialog } = formDialog({
    title,
    body: h(
      "div",
      h("div", { class: "banner banner-warning", role: "note" }, icon("alert", "banner-icon"), h("div", { class: "banner-body", text })),
      h("label", { for: "reveal-value", class: "label", text: label }),
      h("div", { class: "input-row" }, input, copy),
      copied,
    ),
    submitLabel: "Done",
    onSubmit: async () => {},
  });
  dialog.querySelector(".dialog-foot .btn:not(.btn-primary)").remove();
  input.select();
}

// --- form fields ---------------------------------------------------------------------------------

let fieldSeq = 0;

/** A labelled input. opts: {name, label, type, value, help, required, placeholder, ...attrs}. */
export function field({ label, help = null, control = null, className = "", ...attrs }) {
  const id = attrs.id || `f-${attrs.name || "x"}-${++fieldSeq}`;
  const input = control || h("input", { type: "text", ...attrs, id });
  if (control) control.id = control.id || id;
  const helpId = help ? `${input.id}-help` : null;
  if (helpId) input.setAttribute("aria-describedby", helpId);
  return h(
    "div",
    { class: ["field", className] },
    h("label", { for: input.id, class: "label", text: label }),
    input,
    help ? h("p", { class: "help", id: helpId }, help) : null,
  );
}

/**
 * Show or hide a part of a form, and enable or disable its controls with it: a field that does
 * not apply (the other kind's fields, a time for "every hour") can be neither seen nor sent.
 */
export function setApplies(part, applies) {
  part.hidden = !applies;
  for (const control of part.querySelectorAll("input, select, textarea, button")) control.disabled = !applies;
}

export function select(name, options, value, attrs = {}) {
  return h(
    "select",
    { name, ...attrs },
    options.map(([v, text]) => h("option", { value: v, selected: String(v) === String(value), text })),
  );
}

// --- page layout ---------------------------------------------------------------------------------

export function pageHeader(title, subtitle = null, ...actions) {
  return h(
    "div",
    { class: "page-head" },
    h("div", { class: "page-title" }, h("h1", { text: title }), subtitle ? h("p", { class: "muted", text: subtitle }) : null),
    actions.length ? h("div", { class: "page-actions" }, actions) : null,
  );
}

export function card(title, { actions = [], className = "", subtitle = null } = {}, ...children) {
  return h(
    "section",
    { class: ["card", className], "aria-label": title || null },
    title || actions.length
      ? h(
          "div",
          { class: "card-head" },
          h("div", title ? h("h2", { text: title }) : null, subtitle ? h("p", { class: "muted small", text: subtitle }) : null),
          actions.length ? h("div", { class: "card-actions" }, actions) : null,
        )
      : null,
    children,
  );
}

export function emptyState(iconName, title, text, ...actions) {
  return h(
    "div",
    { class: "empty" },
    h("div", { class: "empty-icon" }, icon(iconName)),
    h("p", { class: "empty-title", text: title }),
    text ? h("p", { class: "muted", text }) : null,
    actions.length ? h("div", { class: "empty-actions" }, actions) : null,
  );
}

export function loading(text = "Loading…") {
  return h("div", { class: "loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), h("span", { text }));
}

/**
 * A table. columns: [{label, cell(row) -> node|string, className}]; rows: data.
 * Columns with className "hide-md" disappear at tablet width.
 */
export function table(columns, rows, { caption = null, rowAttrs = null } = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "table" },
      caption ? h("caption", { class: "sr-only", text: caption }) : null,
      h("thead", h("tr", columns.map((c) => h("th", { scope: "col", class: c.className || null, text: c.label })))),
      h(
        "tbody",
        rows.map((row) =>
          h(
            "tr",
            rowAttrs ? rowAttrs(row) : null,
            columns.map((c) => h("td", { class: c.className || null, "data-label": c.label }, c.cell(row))),
          ),
        ),
      ),
    ),
  );
}

export function pill(text, tone = "neutral", title = null) {
  return h("span", { class: `pill pill-${tone}`, title }, text);
}

const STATE_TONES = {
  queued: "neutral",
  running: "info",
  succeeded: "good",
  failed: "bad",
  cancelled: "neutral",
  interrupted: "warn",
};

export function statePill(state, label) {
  return pill(label, STATE_TONES[state] || "neutral");
}

/** A progress bar; fraction null draws an indeterminate (moving) bar. */
export function progressBar(fraction, label) {
  const known = fraction !== null && fraction !== undefined && Number.isFinite(fraction);
  const value = known ? Math.max(0, Math.min(1, fraction)) : 0;
  const bar = h(
    "div",
    {
      class: known ? "progress" : "progress progress-indeterminate",
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": known ? Math.round(value * 100) : null,
    },
    h("div", { class: "progress-fill" }),
  );
  if (known) bar.firstChild.style.width = `${(value * 100).toFixed(1)}%`;
  return bar;
}

export function button(label, { iconName = null, kind = "", onClick = null, href = null, ...attrs } = {}) {
  const cls = ["btn", kind ? `btn-${kind}` : null, attrs.class].filter(Boolean).join(" ");
  delete attrs.class;
  if (href) return h("a", { class: cls, href, ...attrs }, iconName ? icon(iconName) : null, h("span", { text: label }));
  return h("button", { type: "button", class: cls, onClick, ...attrs }, iconName ? icon(iconName) : null, h("span", { text: label }));
}

/** Run an action from a button: disable it meanwhile, show errors in the banner. */
export async function busy(buttonEl, banner, action) {
  if (buttonEl) {
    buttonEl.disabled = true;
    buttonEl.classList.add("busy");
  }
  try {
    return await action();
  } catch (err) {
    if (banner) banner.error(err);
    else toast(humanError(err).text, { kind: "error" });
    return undefined;
  } finally {
    if (buttonEl) {
      buttonEl.disabled = false;
      buttonEl.classList.remove("busy");
    }
  }
}

/** The window event a screen fires when it changed alerts (acknowledged, resolved): the Alerts
 * entry's badge in the navigation reads the open count again at once (main.js). */
export const ALERTS_CHANGED = "appliance:alerts-changed";
