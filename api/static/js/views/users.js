// Users (with roles) and API tokens (shown once, revocable). Administrators only.

import { api, enc, q } from "../api.js";
import { h, replace } from "../dom.js";
import { ROLE_NAMES, dateTime, shortId } from "../format.js";
import { button, busy, card, confirmDialog, emptyState, field, formDialog, loading, pageHeader, pill, revealDialog, select, table, toast, deleteButton } from "../ui.js";

const ROLES = [
  ["viewer", "Viewer: sees everything, changes nothing"],
  ["operator", "Operator: also runs backups, restores and downloads"],
  ["admin", "Administrator: also manages assets, policies and users"],
];
const RANK = { viewer: 0, operator: 1, admin: 2 };

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
  formDialog({
    title: "Create an API token",
    description: "Scripts and other appliances use a token instead of a password (header: Authorization: Bearer <token>). A token never has more rights than its user.",
    submitLabel: "Create token",
    body: h("div", field({ label: "For user", control: userSelect }), field({ label: "Role of the token", control: roleSelect, help: "Give scripts the lowest role that does the job." })),
    onSubmit: async (form) => {
      const body = { user: form.elements.user.value };
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
    const tokenActions = (t) =>
      t.revoked_at
        ? h("span", { class: "muted small", text: "—" })
        : button("Revoke", {
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
          });
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
              { label: "Status", cell: (t) => (t.revoked_at ? pill(`Revoked ${dateTime(t.revoked_at)}`, "neutral") : pill("Active", "good")) },
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
