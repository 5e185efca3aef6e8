// Alerts: what went wrong and who was told (acknowledge to stop repeats), and, for
// administrators, where alerts are sent (e-mail, webhooks with presets, a test button), the rule
// of each kind of alert and the summary mail.

import { api, enc, q } from "../api.js";
import { h, replace } from "../dom.js";
import { count, dateTime, period } from "../format.js";
import { ALERTS_CHANGED, busy, button, card, deleteButton, emptyState, field, formDialog, loading, pageHeader, pill, select, table, toast } from "../ui.js";

const SEVERITY_TONES = { critical: "bad", warning: "warn", info: "info" };
const SEVERITY_NAMES = { critical: "Critical", warning: "Warning", info: "Information" };
const STATES = [
  ["open", "Needs attention"],
  ["acknowledged", "Acknowledged"],
  ["resolved", "Resolved"],
  ["", "All"],
];
const PRESETS = [
  ["generic", "Generic JSON"],
  ["ntfy", "ntfy"],
  ["gotify", "Gotify"],
  ["slack", "Slack-style incoming webhook (also Mattermost, Rocket.Chat)"],
  ["teams", "Microsoft Teams incoming webhook"],
];
const REPEATS = [
  [0, "Never"],
  [3600, "Every hour"],
  [6 * 3600, "Every 6 hours"],
  [86400, "Every day"],
  [7 * 86400, "Every week"],
];
const FREQUENCIES = [
  ["off", "Off"],
  ["daily", "Every day"],
  ["weekly", "Every Monday"],
];

function severityPill(severity) {
  return pill(SEVERITY_NAMES[severity] || severity, SEVERITY_TONES[severity] || "neutral");
}

function deliveryCell(alert) {
  if (!alert.delivery.length) return h("span", { class: "muted small", text: "Shown here only" });
  return h(
    "div",
    { class: "alert-delivery" },
    alert.delivery.map((d) => {
      const name = d.channel || "a removed channel";
      if (d.state === "sent") return pill(`Sent to ${name}`, "good");
      const retry = d.next_retry ? ` Trying again at ${dateTime(d.next_retry)}.` : " No more tries.";
      return h("div", pill(`Not delivered to ${name}`, "bad"), h("p", { class: "small alert-error", text: `${d.error || "Unknown error"}.${retry}` }));
    }),
  );
}

function seenCell(alert) {
  if (alert.count === 1) return dateTime(alert.first_seen);
  return h("div", h("span", { text: dateTime(alert.last_seen) }), h("p", { class: "muted small", text: `Seen ${count(alert.count, "time")} since ${dateTime(alert.first_seen)}` }));
}

function stateCell(alert) {
  if (alert.state === "resolved") return pill(`Resolved ${dateTime(alert.resolved_at)}`, "good");
  if (alert.state === "acknowledged") return pill(`Acknowledged by ${alert.acknowledged_by}`, "neutral");
  return pill("Needs attention", "warn");
}

// --- channels ------------------------------------------------------------------------------------------

function channelDialog(kind, done) {
  const email = kind === "email";
  const preset = select("preset", PRESETS, "generic");
  const security = select("security", [["starttls", "STARTTLS (usually port 587)"], ["tls", "TLS from the start (usually port 465)"]], "starttls");
  const body = email
    ? h(
        "div",
        field({ label: "Name", name: "name", required: true, value: "E-mail" }),
        field({ label: "SMTP server", name: "host", required: true, placeholder: "smtp.example.com" }),
        field({ label: "Encryption", control: security, help: "Mail is only ever sent encrypted." }),
        field({ label: "Port", name: "port", type: "number", min: 1, max: 65535, placeholder: "587" }),
        field({ label: "Login name", name: "username", autocomplete: "off" }),
        field({ label: "Password", name: "password", type: "password", autocomplete: "new-password", help: "Kept on the appliance only; never shown again." }),
        field({ label: "From address", name: "sender", type: "email", required: true, placeholder: "backup@example.com" }),
        field({ label: "Send to", name: "recipients", required: true, placeholder: "you@example.com", help: "Several addresses: separate them with commas." }),
        field({ label: "CA certificate file (optional)", name: "ca_file", placeholder: "/etc/ssl/my-ca.pem", help: "Only for a server whose certificate your own authority signed. Leave empty to use the system's." }),
      )
    : h(
        "div",
        field({ label: "Name", name: "name", required: true, value: "Phone" }),
        field({ label: "Kind of receiver", control: preset }),
        field({ label: "Address", name: "url", type: "url", required: true, placeholder: "https://ntfy.sh/my-backups", help: "Kept on the appliance only; never shown again (it often contains a token)." }),
        field({ label: "Signing key (optional)", name: "hmac_key", type: "password", autocomplete: "off", help: "Adds an X-Appliance-Signature header your receiver can check." }),
      );
  formDialog({
    title: email ? "Send alerts by e-mail" : "Send alerts to a webhook",
    submitLabel: "Add channel",
    body,
    onSubmit: async (form) => {
      const f = form.elements;
      const payload = { name: f.name.value.trim(), kind };
      if (email) {
        payload.email = {
          host: f.host.value.trim(),
          security: f.security.value,
          username: f.username.value.trim(),
          sender: f.sender.value.trim(),
          recipients: f.recipients.value.split(",").map((r) => r.trim()).filter(Boolean),
          ca_file: f.ca_file.value.trim(),
        };
        if (f.port.value) payload.email.port = Number(f.port.value);
        if (f.password.value) payload.password = f.password.value;
      } else {
        payload.webhook = { preset: f.preset.value };
        payload.url = f.url.value.trim();
        if (f.hmac_key.value) payload.hmac_key = f.hmac_key.value;
      }
      await api.post("/api/alert-channels", payload);
      toast(`Channel ${payload.name} added. Send a test alert to check it.`);
      done();
    },
  });
}

function channelWhere(c) {
  if (c.kind === "email") return `E-mail to ${c.settings.recipients.join(", ")} via ${c.settings.host}`;
  const preset = PRESETS.find(([v]) => v === c.settings.preset);
  return `${preset ? preset[1] : "Webhook"} at ${c.url_host || "an address not set"}`;
}

function channelsCard(view, channels, reload) {
  const testButton = (c) => {
    const b = button("Send test alert", {
      kind: "small",
      "aria-label": `Send a test alert to ${c.name}`,
      onClick: async () => {
        const result = await busy(b, view.banner, () => api.post(`/api/alert-channels/${enc(c.id)}/test`));
        if (!result) return;
        if (result.ok) toast(`Test alert sent to ${c.name}.`);
        else view.banner.show("error", `The test alert did not reach ${c.name}`, result.error);
      },
    });
    return b;
  };
  const toggle = (c) => {
    const b = button(c.enabled ? "Turn off" : "Turn on", {
      kind: "small",
      "aria-label": `${c.enabled ? "Turn off" : "Turn on"} ${c.name}`,
      onClick: async () => {
        const ok = await busy(b, view.banner, () => api.patch(`/api/alert-channels/${enc(c.id)}`, { enabled: !c.enabled }));
        if (ok) reload();
      },
    });
    return b;
  };
  return card(
    "Where alerts go",
    {
      subtitle: "Every alert is listed on this page. Add e-mail or a webhook so that alerts also reach you when you are not looking.",
      actions: [
        button("Add e-mail", { iconName: "plus", kind: "primary", onClick: () => channelDialog("email", reload) }),
        button("Add webhook", { iconName: "plus", onClick: () => channelDialog("webhook", reload) }),
      ],
    },
    channels.length
      ? table(
          [
            { label: "Channel", cell: (c) => h("span", h("strong", { text: c.name }), c.enabled ? null : [" ", pill("Off", "neutral")]) },
            { label: "Sends to", cell: channelWhere },
            {
              label: "Actions",
              className: "actions",
              cell: (c) =>
                h(
                  "div",
                  { class: "row-actions" },
                  testButton(c),
                  toggle(c),
                  deleteButton({ label: `Delete channel ${c.name}`, title: `Delete channel ${c.name}?`, text: "Alerts are no longer sent there.", confirmLabel: "Delete channel", path: `/api/alert-channels/${enc(c.id)}`, deleted: `Channel ${c.name} deleted.`, done: reload }),
                ),
            },
          ],
          channels,
          { caption: "Alert channels", rowAttrs: (c) => ({ dataset: { channel: c.name } }) },
        )
      : emptyState("alert", "Alerts are shown on this page only", "Add e-mail or a webhook to be told when a backup fails."),
  );
}

// --- rules and the summary ---------------------------------------------------------------------------

function rulesCard(view, rules, channels, reload) {
  // The test alert is sent by hand only: it has no rule worth changing.
  const rows = rules.filter((r) => r.kind !== "test").map((r) => ({
    rule: r,
    enabled: h("input", { type: "checkbox", checked: r.enabled, "aria-label": `Raise "${r.title}"` }),
    severity: select("severity", Object.entries(SEVERITY_NAMES), r.severity, { "aria-label": `Severity of "${r.title}"`, class: "compact" }),
    repeat: select("repeat", REPEATS.some(([v]) => v === r.repeat_seconds) ? REPEATS : [...REPEATS, [r.repeat_seconds, `Every ${period(r.repeat_seconds)}`]], r.repeat_seconds, { "aria-label": `Repeat "${r.title}"`, class: "compact" }),
  }));
  const save = button("Save rules", {
    kind: "primary",
    onClick: async () => {
      const body = rows.map((row) => ({
        kind: row.rule.kind,
        enabled: row.enabled.checked,
        severity: row.severity.value,
        channels: row.rule.channels.filter((id) => channels.some((c) => c.id === id)),
        repeat_seconds: Number(row.repeat.value),
      }));
      const ok = await busy(save, view.banner, () => api.put("/api/alert-rules", body));
      if (ok) {
        toast("Alert rules saved.");
        reload();
      }
    },
  });
  return card(
    "Rules",
    { subtitle: "Which alerts are raised, how serious they are, and how often one that stays unresolved is sent again. An acknowledged alert is not sent again.", actions: [save] },
    table(
      [
        { label: "Raise", cell: (row) => row.enabled },
        { label: "Alert", cell: (row) => row.rule.title },
        { label: "Severity", cell: (row) => row.severity },
        { label: "Send again while unresolved", cell: (row) => row.repeat, className: "hide-md" },
      ],
      rows,
      { caption: "Alert rules", rowAttrs: (row) => ({ dataset: { rule: row.rule.kind } }) },
    ),
  );
}

function summaryCard(view, summary) {
  const frequency = select("frequency", FREQUENCIES, summary.frequency, { "aria-label": "Summary mail" });
  const hours = Array.from({ length: 24 }, (_, i) => [i, `${String(i).padStart(2, "0")}:00`]);
  const hour = select("hour", hours, summary.hour, { "aria-label": "Hour of the summary mail" });
  const save = button("Save", {
    kind: "small",
    onClick: async () => {
      const ok = await busy(save, view.banner, () => api.put("/api/alert-summary", { frequency: frequency.value, hour: Number(hour.value) }));
      if (ok) toast("Summary mail saved.");
    },
  });
  return card(
    "Summary mail",
    { subtitle: "A short mail to the e-mail channels listing what still needs attention. Nothing is sent on a quiet day." },
    h("div", { class: "alert-summary-row" }, field({ label: "Send", control: frequency }), field({ label: "At (the appliance's time)", control: hour }), save),
  );
}

// --- the screen -------------------------------------------------------------------------------------

export default async function alertsView(view) {
  const filters = { state: view.query.get("state") ?? "open", severity: view.query.get("severity") || "" };
  const listBody = h("div", loading());
  const adminBody = h("div");
  const stateSelect = select("state", STATES, filters.state, { "aria-label": "Show", class: "compact" });
  const severitySelect = select("severity", [["", "Any severity"], ...Object.entries(SEVERITY_NAMES)], filters.severity, { "aria-label": "Severity", class: "compact" });
  stateSelect.addEventListener("change", () => {
    filters.state = stateSelect.value;
    loadList();
  });
  severitySelect.addEventListener("change", () => {
    filters.severity = severitySelect.value;
    loadList();
  });
  replace(
    view.el,
    pageHeader("Alerts", "Problems the appliance found, and whom it told."),
    card("Alerts", { actions: [stateSelect, severitySelect] }, listBody),
    adminBody,
  );

  async function loadList() {
    let alerts;
    try {
      alerts = await api.get(q("/api/alerts", { state: filters.state || null, severity: filters.severity || null }));
    } catch (err) {
      view.banner.error(err);
      replace(listBody);
      return;
    }
    const resolveButton = (a) => {
      const b = button("Resolve", {
        kind: "small",
        "aria-label": `Resolve: ${a.title} (${a.subject})`,
        onClick: async () => {
          const ok = await busy(b, view.banner, () => api.post(`/api/alerts/${a.id}/resolve`));
          if (ok) {
            window.dispatchEvent(new Event(ALERTS_CHANGED));
            toast("Resolved. If the problem is still there, a new alert is raised.");
            loadList();
          }
        },
      });
      return b;
    };
    const actions = (a) => {
      if (a.state === "resolved" || !view.can("operator")) return null;
      return h("div", { class: "row-actions" }, ack(a), resolveButton(a));
    };
    const ack = (a) => {
      if (a.state !== "open") return null;
      const b = button("Acknowledge", {
        kind: "small",
        "aria-label": `Acknowledge: ${a.title} (${a.subject})`,
        onClick: async () => {
          const ok = await busy(b, view.banner, () => api.post(`/api/alerts/${a.id}/acknowledge`));
          if (ok) {
            window.dispatchEvent(new Event(ALERTS_CHANGED));
            toast("Acknowledged: it is not sent again, and stays listed until it is resolved.");
            loadList();
          }
        },
      });
      return b;
    };
    if (!alerts.length) {
      // No open alert is not "all is well": an asset without a policy or a second copy raises
      // no alert, so the empty list says where those are shown instead of claiming nothing is wrong.
      if (filters.state !== "open") {
        replace(listBody, emptyState("check", "No alerts", null));
        return;
      }
      const text = "When a backup fails or is missed, it shows here. What is not fully protected (no policy, a single copy, never test-booted) is on the dashboard.";
      replace(listBody, emptyState("check", "No open alerts", text, button("See the dashboard", { href: "#/" })));
      return;
    }
    replace(
      listBody,
      table(
        [
          { label: "Severity", cell: (a) => severityPill(a.severity) },
          { label: "What", cell: (a) => h("div", h("strong", { text: a.title }), h("p", { class: "small", text: a.message })) },
          { label: "When", cell: seenCell, className: "hide-md" },
          { label: "Told", cell: deliveryCell, className: "hide-md" },
          { label: "State", cell: stateCell },
          { label: "Actions", cell: actions, className: "actions" },
        ],
        alerts,
        { caption: "Alerts", rowAttrs: (a) => ({ dataset: { alert: String(a.id), kind: a.kind } }) },
      ),
    );
  }

  async function loadAdmin() {
    if (!view.can("admin")) return;
    let channels;
    let rules;
    let summary;
    try {
      [channels, rules, summary] = await Promise.all([api.get("/api/alert-channels"), api.get("/api/alert-rules"), api.get("/api/alert-summary")]);
    } catch (err) {
      view.banner.error(err);
      return;
    }
    replace(adminBody, channelsCard(view, channels, loadAdmin), rulesCard(view, rules, channels, loadAdmin), summaryCard(view, summary));
  }

  await Promise.all([loadList(), loadAdmin()]);
}
