// Users (with roles) and API tokens (shown once, revocable, with an optional expiry that can be
// changed while the token works). Administrators only.

import { api, enc, q } from "../api.js";
import { h, replace } from "../dom.js";
import { ROLE_NAMES, count, dateTime, shortId } from "../format.js";
import { button, busy, card, confirmDialog, emptyState, field, formDialog, loading, pageHeader, pill, revealDialog, select, setApplies, table, toast, deleteButton } from "../ui.js";

const ROLES = [
  ["viewer", "Viewer: sees everything, changes nothing"],
  ["operator", "Operator: also runs backups, restores and downloads"],
  ["admin", "Administrator: also manages assets, policies and users"],
];
const RANK = { viewer: 0, operator: 1, admin: 2 };
// Fixed choices start beyond the alerts' warning window: a token made for 90 days is not
// announced as "expiring" the day it is made. A nearer day can still be picked as a date.
const EXPIRY_CHOICES = [
  ["never", "Never"],
  ["90", "In 90 days"],
  ["180", "In 180 days"],
  ["365", "In a year"],
  ["date", "On a date…"],
];
// The alerts warn this long before a token expires (appliance.alerts.evaluate.EXPIRY_WARNING).
const WARN_DAYS = 30;
const DAY_MS = 86400000;

/**
 * The "Expires" choice and its date field (disabled unless "On a date…" is chosen). `body()` is
 * the request's expiry: {} or {never: true} for never (`neverBody`), {expires_in_days} or
 * {expires_at} (the end of the chosen day in the browser's time zone).
 */
function expiryFields(initial, neverBody) {
  const choice = select("expiry", EXPIRY_CHOICES, initial);
  const dateInput = h("input", { type: "date", name: "expires_on" });
  const datePart = h("div", field({ label: "Expires on", control: dateInput, help: "The token stops working at the end of this day (your browser's time zone)." }));
  setApplies(datePart, false);
  choice.addEventListener("change", () => setApplies(datePart, choice.value === "date"));
  const body = () => {
    if (choice.value === "never") return { ...neverBody };
    if (choice.value !== "date") return { expires_in_days: Number(choice.value) };
    const [y, m, d] = dateInput.value.split("-").map(Number);
    if (!y || !m || !d) throw new Error("Pick the day the token expires, or another choice");
    const end = new Date(y, m - 1, d + 1);
    if (end.getTime() <= Date.now()) throw new Error("That day is over: pick a day from today on");
    return { expires_at: end.toISOString() };
  };
  const el = h("div", field({ label: "Expires", control: choice, help: `The alerts warn ${WARN_DAYS} days before a token expires; an expired token is refused.` }), datePart);
  return { el, body };
}

/** "Never", "12 Mar 2027, 10:00", or a pill when it is close or past. */
function expiryCell(t, now) {
  if (t.revoked_at) return h("span", { class: "muted", text: "—" });
  if (!t.expires_at) return h("span", { class: "muted", text: "Never" });
  const left = new Date(t.expires_at).getTime() - now;
  if (left <= 0) return pill(`Expired ${dateTime(t.expires_at)}`, "bad");
  if (left <= WARN_DAYS * DAY_MS) {
    const days = Math.round(left / DAY_MS);
    return pill(days ? `In ${count(days, "day")}` : "Within a day", "warn", dateTime(t.expires_at));
  }
  return h("span", { text: dateTime(t.expires_at) });
}

function tokenStatus(t, now) {
  if (t.revoked_at) return pill(`Revoked ${dateTime(t.revoked_at)}`, "neutral");
  if (t.expires_at && new Date(t.expires_at).getTime() <= now) return pill("Expired", "bad");
  return pill("Active", "good");
}

function renewDialog(t, done) {
  const expiry = expiryFields("90", { never: true });
  formDialog({
    title: `Expiry of token ${shortId(t.id)}`,
    description: `Token ${shortId(t.id)} of ${t.user} ${t.expires_at ? `expires ${dateTime(t.expires_at)}` : "never expires"}. Scripts using it keep working with the new expiry.`,
    submitLabel: "Set expiry",
    body: expiry.el,
    onSubmit: async () => {
      const renewed = await api.patch(`/api/tokens/${enc(t.id)}`, expiry.body());
      toast(renewed.expires_at ? `Token ${shortId(t.id)} now expires ${dateTime(renewed.expires_at)}.` : `Token ${shortId(t.id)} never expires now.`);
      done();
    },
  });
}

function roleTone(role) {
  return role === "admin" ? "info" : role === "operator" ? "good" : "neutral";
}

function userDialog(done) {
  formDialog({
    title: "Add a user",
    submitLabel: "Add user",
    body: h(
      "div",
      field({ label: "User name", name: "name", required: true, autocomplete: "off", help: "Letters, digits, dots, dashes and underscores." }),
      field({ label: "Role", control: select("role", ROLES, "viewer") }),
      field({ label: "Password", name: "password", type: "password", required: true, autocomplete: "new-password", help: "At least 8 characters. Tell it to the user in person." }),
    ),
    onSubmit: async (form) => {
      const name = form.elements.name.value.trim();
      await api.post("/api/users", { name, role: form.elements.role.value, password: form.elements.password.value });
      toast(`User ${name} added.`);
      done();
    },
  });
}

function passwordDialog(user) {
  const revoke = h("input", { type: "checkbox", name: "revoke_tokens", checked: true });
  formDialog({
    title: `New password for ${user.name}`,
    description: "Every session of this user ends: they sign in again with the new password.",
    submitLabel: "Set password",
    body: h(
      "div",
      field({ label: "New password", name: "password", type: "password", required: true, autocomplete: "new-password", help: "At least 8 characters." }),
      h("label", { class: "fo-check" }, revoke, h("span", { text: "Also revoke their API tokens (scripts using them stop working)" })),
    ),
    onSubmit: async (form) => {
      await api.patch(`/api/users/${enc(user.name)}`, { password: form.elements.password.value, revoke_tokens: revoke.checked });
      toast(`Password of ${user.name} changed; their sessions ended.`);
    },
  });
}

function disableButton(user, done) {
  if (user.disabled) {
    return button("Enable", {
      kind: "small",
      "aria-label": `Enable ${user.name}`,
      onClick: async () => {
        await api.patch(`/api/users/${enc(user.name)}`, { disabled: false });
        toast(`${user.name} can sign in again.`);
        done();
      },
    });
  }
  return button("Disable", {
    kind: "small",
    "aria-label": `Disable ${user.name}`,
    onClick: () =>
      confirmDialog({
        title: `Disable ${user.name}?`,
        text: "They are signed out everywhere, their API tokens are revoked, and they cannot sign in until an administrator enables the account again.",
        confirmLabel: "Disable user",
        action: async () => {
          await api.patch(`/api/users/${enc(user.name)}`, { disabled: true });
          toast(`${user.name} is disabled.`);
          done();
        },
      }),
  });
}

function tokenDialog(users, me, done) {
  const userSelect = select("user", users.map((u) => [u.name, `${u.name} (${ROLE_NAMES[u.role]})`]), me);
  const roleSelect = select("role", [["", "Same as the user"], ...ROLES.map(([v]) => [v, ROLE_NAMES[v]])], "");
  const expiry = expiryFields("never", {});
  formDialog({
    title: "Create an API token",
    description: "Scripts and other appliances use a token instead of a password (header: Authorization: Bearer <token>). A token never has more rights than its user.",
    submitLabel: "Create token",
    body: h("div", field({ label: "For user", control: userSelect }), field({ label: "Role of the token", control: roleSelect, help: "Give scripts the lowest role that does the job." }), expiry.el),
    onSubmit: async (form) => {
      const body = { user: form.elements.user.value, ...expiry.body() };
      if (form.elements.role.value) body.role = form.elements.role.value;
      const owner = users.find((u) => u.name === body.user);
      if (owner && body.role && RANK[body.role] > RANK[owner.role]) {
        throw new Error(`A token of ${owner.name} can have at most the ${ROLE_NAMES[owner.role]} role`);
      }
      const created = await api.post("/api/tokens", body);
      done();
      setTimeout(
        () =>
          revealDialog({
            title: "Your new API token",
            text: "Copy it now: this is the only time it is shown. The appliance keeps only a fingerprint of it.",
            value: created.token,
            label: `API token for ${created.user} (${ROLE_NAMES[created.role] || created.role})`,
          }),
        0,
      );
    },
  });
}

export default async function usersView(view) {
  const body = h("div", loading());
  replace(view.el, pageHeader("Users & tokens", "Who can sign in, with which role, and the API tokens scripts use."), body);

  async function load() {
    let users;
    let tokens;
    try {
      [users, tokens] = await Promise.all([api.get("/api/users"), api.get(q("/api/tokens"))]);
    } catch (err) {
      view.banner.error(err);
      replace(body);
      return;
    }
    const roleControl = (u) => {
      const control = select("role", ROLES.map(([v]) => [v, ROLE_NAMES[v]]), u.role, { "aria-label": `Role of ${u.name}`, class: "compact" });
      control.addEventListener("change", async () => {
        const ok = await busy(control, view.banner, () => api.patch(`/api/users/${enc(u.name)}`, { role: control.value }));
        if (ok) toast(`${u.name} is now ${ROLE_NAMES[control.value]}.`);
        load();
      });
      return control;
    };
    const userActions = (u) =>
      h(
        "div",
        { class: "row-actions" },
        button("Set password", { kind: "small", iconName: "key", onClick: () => passwordDialog(u) }),
        u.name !== view.session.name ? disableButton(u, load) : null,
        u.name !== view.session.name
          ? deleteButton({ label: `Delete user ${u.name}`, title: `Delete user ${u.name}?`, text: "They can no longer sign in, and their API tokens stop working.", confirmLabel: "Delete user", path: `/api/users/${enc(u.name)}`, deleted: `User ${u.name} deleted.`, done: load })
          : h("span", { class: "muted small", text: "You" }),
      );
    const usersCard = card(
      "Users",
      { actions: [button("Add user", { iconName: "plus", kind: "primary", onClick: () => userDialog(load) })] },
      table(
        [
          { label: "User", cell: (u) => h("span", h("strong", { text: u.name }), u.disabled ? [" ", pill("Disabled", "warn")] : null) },
          { label: "Role", cell: roleControl },
          { label: "Added", cell: (u) => dateTime(u.created_at), className: "hide-md" },
          { label: "Actions", cell: userActions, className: "actions" },
        ],
        users,
        { caption: "Users", rowAttrs: (u) => ({ dataset: { user: u.name } }) },
      ),
    );
    const now = Date.now();
    const working = (t) => !t.revoked_at && !(t.expires_at && new Date(t.expires_at).getTime() <= now);
    const tokenActions = (t) =>
      t.revoked_at
        ? h("span", { class: "muted small", text: "—" })
        : h(
            "div",
            { class: "row-actions" },
            working(t) ? button("Change expiry", { kind: "small", "aria-label": `Change expiry of token ${shortId(t.id)}`, onClick: () => renewDialog(t, load) }) : null,
            button("Revoke", {
              kind: "small",
              "aria-label": `Revoke token ${shortId(t.id)}`,
              onClick: () =>
                confirmDialog({
                  title: "Revoke this token?",
                  text: `Scripts using token ${shortId(t.id)} of ${t.user} stop working at once. This cannot be undone.`,
                  confirmLabel: "Revoke token",
                  action: async () => {
                    await api.del(`/api/tokens/${enc(t.id)}`);
                    toast("Token revoked.");
                    load();
                  },
                }),
            }),
          );
    const tokensCard = card(
      "API tokens",
      { subtitle: "For scripts and peer appliances. Only a fingerprint is stored.", actions: [button("Create token", { iconName: "key", onClick: () => tokenDialog(users, view.session.name, load) })] },
      tokens.length
        ? table(
            [
              { label: "Token", cell: (t) => h("span", { class: "mono", text: shortId(t.id) }) },
              { label: "User", cell: (t) => t.user },
              { label: "Role", cell: (t) => pill(ROLE_NAMES[t.role] || t.role, roleTone(t.role)) },
              { label: "Created", cell: (t) => dateTime(t.created_at), className: "hide-md" },
              { label: "Expires", cell: (t) => expiryCell(t, now) },
              { label: "Status", cell: (t) => tokenStatus(t, now) },
              { label: "Actions", cell: tokenActions, className: "actions" },
            ],
            tokens,
            { caption: "API tokens", rowAttrs: (t) => ({ dataset: { token: t.id } }) },
          )
        : emptyState("key", "No API tokens", "Create one for a script or another appliance."),
    );
    replace(body, usersCard, tokensCard);
  }
  await load();
}
