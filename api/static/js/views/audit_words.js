// The audit log in sentences: one per kind of action, its details summarised in words.
//
// A sentence names what was done to what ("Added policy nightly for web and mail, every day at
// 22:00"); the details a sentence does not use are summarised after it, never shown as JSON.
// An action the page has no sentence for is told by its name ("Peer pull: the-peer").

import { auditAction, bytes, capitalise, count, dateTime, describeCron, listText, period, shortId } from "../format.js";

const SETTING_NAMES = {
  appliance_name: "the appliance's name",
  timezone: "the time zone",
  scheduler_paused: "scheduled backups",
  gc_grace_seconds: "the clean-up grace period",
  verify_max_bytes: "the verification budget",
  cron: "the schedule",
  areas: "the restore folders",
  devices: "the restore devices",
};

function scheduleText(schedule) {
  const entries = (schedule && schedule.entries) || [];
  if (!entries.length) return "run by hand only";
  return listText(entries.map((e) => `${describeCron(e.cron).toLowerCase()}${e.mode === "boot_test" ? " (boot test)" : ""}`));
}

function assetsOf(d) {
  if (Array.isArray(d.assets)) return listText(d.assets);
  return d.asset || "";
}

function settingValue(key, value) {
  if (value === null || value === undefined || value === "") return "none";
  if (typeof value === "boolean") return key === "scheduler_paused" ? (value ? "paused" : "running") : value ? "on" : "off";
  if (Array.isArray(value)) return value.length ? listText(value) : "none";
  if (key === "cron") return describeCron(value).toLowerCase();
  if (/bytes/.test(key) && typeof value === "number") return bytes(value);
  if (/seconds/.test(key) && typeof value === "number") return period(value);
  if (typeof value === "object") return Object.keys(value).length ? listText(Object.keys(value).map((k) => k.replace(/_/g, " "))) : "none";
  return String(value);
}

/** "the time zone Europe/Berlin, scheduled backups running". */
function settingsText(d) {
  return listText(
    Object.entries(d)
      .filter(([k]) => !["via", "client", "job"].includes(k))
      .map(([k, v]) => `${SETTING_NAMES[k] || k.replace(/_/g, " ")} ${settingValue(k, v)}`),
  );
}

const DESTINATIONS = { area: "a restore folder", source: "its own place", device: "a restore device" };

const SENTENCES = {
  login: (e) => `Signed in from ${e.target}`,
  "login.failed": (e) => `Failed to sign in as ${e.target}`,
  "asset.create": (e) => `Added asset ${e.target}${e.details.kind === "vm" ? " (a virtual machine)" : e.details.kind === "files" ? " (a folder)" : ""}`,
  "asset.update": (e) => `Changed asset ${e.target}`,
  "asset.delete": (e) => `Deleted asset ${e.target}`,
  "asset.backup": (e) => `Started a${e.details.mode === "incremental" ? "n incremental" : e.details.mode ? ` ${e.details.mode}` : ""} backup of ${e.target}`,
  "policy.create": (e) => `Added policy ${e.target} for ${assetsOf(e.details)}: ${scheduleText(e.details.schedule)}`,
  "policy.update": (e) => `Changed policy ${e.target} for ${assetsOf(e.details)}: ${scheduleText(e.details.schedule)}`,
  "policy.delete": (e) => `Deleted policy ${e.target}`,
  "policy.run": (e) => `Ran policy ${e.target} now${e.details.jobs ? ` (${count(e.details.jobs.length, "backup")})` : ""}`,
  "point.restore": (e) => `Started a restore of point ${shortId(e.target)}${e.details.path ? ` (only ${e.details.path})` : ""} to ${e.details.resolved || DESTINATIONS[e.details.destination] || "its target"}`,
  "point.download": (e) => `Downloaded from point ${shortId(e.target)}`,
  "point.copy": (e) => `Started a copy of point ${shortId(e.target)}`,
  "point.verify": (e) => `Started a verification of point ${shortId(e.target)}`,
  "point.delete": (e) => `Deleted point ${shortId(e.target)}`,
  "settings.update": (e) => `Changed the settings: ${settingsText(e.details)}`,
  "settings.restore": (e) => `Changed where restores may go: ${settingsText(e.details)}`,
  "settings.verify_schedule": (e) => `Changed the verify schedule: ${e.details.cron ? describeCron(e.details.cron).toLowerCase() : "not scheduled"}`,
  "store.verify": () => "Started a verification of the store",
  "store.gc": () => "Started a clean-up of unused data",
  "user.create": (e) => `Added user ${e.target}${e.details.role ? ` (${e.details.role})` : ""}`,
  "user.update": (e) => `Changed user ${e.target}`,
  "user.delete": (e) => `Deleted user ${e.target}`,
  "user.password": (e) => `Changed the password of ${e.target}`,
  "schedule.skip": (e) => `Skipped runs of policy ${e.target} missed while the appliance was off`,
  "token.create": (e) => `Created an API token (${shortId(e.target)})${e.details.user ? ` for ${e.details.user}` : ""}${e.details.expires_at ? `, expiring ${dateTime(e.details.expires_at)}` : ", never expiring"}`,
  "token.renew": (e) => `Changed the expiry of an API token (${shortId(e.target)})${e.details.user ? ` of ${e.details.user}` : ""} to ${e.details.expires_at ? dateTime(e.details.expires_at) : "never"}`,
  "token.revoke": (e) => `Revoked an API token (${shortId(e.target)})${e.details.user ? ` of ${e.details.user}` : ""}`,
  "token.refused": (e) => `Refused an API token (${shortId(e.target)}): it ${e.details.reason === "expired" ? "has expired" : "was revoked"}`,
  "recovery_key.show": () => "Viewed the recovery key in the set-up wizard",
  "recovery_key.confirm": () => "Confirmed that the recovery key is kept safe (the page no longer shows it)",
  "network.update": (e) => `Changed the network of ${e.target}: ${e.details.mode === "static" ? `static address ${e.details.address}${e.details.gateway ? ` via ${e.details.gateway}` : ""}` : "DHCP"}${e.details.dns && e.details.dns.length ? `, DNS ${listText(e.details.dns)}` : ""}`,
  "time.update": (e) => `Set the time zone to ${e.details.timezone}, time servers ${e.details.ntp ? (e.details.ntp_servers && e.details.ntp_servers.length ? listText(e.details.ntp_servers) : "Debian's pool") : "off"}`,
  "security_updates.update": (e) => `Turned automatic security updates ${e.details.enabled ? "on" : "off"}`,
};

// Details every sentence leaves out: who-and-how facts shown in their own words below.
const QUIET = new Set(["via", "client", "job", "jobs", "schedule", "asset", "assets", "resolved", "destination", "path", "mode", "kind", "expires_at"]);

/** The entry as one sentence. */
export function auditSentence(entry) {
  const e = { ...entry, details: entry.details || {} };
  const sentence = SENTENCES[e.action];
  if (sentence) return `${sentence(e)}.`;
  return `${auditAction(e.action)}${e.target ? `: ${e.target}` : ""}.`;
}

/** The details a sentence did not tell, in words: "via the page · job 1a2b3c4d". */
export function auditDetails(entry) {
  const d = entry.details || {};
  const parts = [];
  if (d.via) parts.push(`via ${d.via === "session" ? "the page" : d.via}`);
  if (d.client) parts.push(`from ${d.client}`);
  if (d.job) parts.push(`job ${shortId(d.job)}`);
  if (!SENTENCES[entry.action] || !/^settings\./.test(entry.action)) {
    for (const [k, v] of Object.entries(d)) {
      if (QUIET.has(k) || v === null || v === undefined || v === "") continue;
      if (SENTENCES[entry.action] && typeof v === "object") continue;
      parts.push(`${capitalise(k.replace(/_/g, " "))}: ${settingValue(k, v)}`);
    }
  }
  return parts.join(" · ");
}
