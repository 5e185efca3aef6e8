// Numbers, times and names as a person reads them.

const UNITS = ["bytes", "KB", "MB", "GB", "TB", "PB"];

/** Decimal units, as disks are sold: 1 KB = 1000 bytes. */
export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "—";
  let value = Number(n);
  if (Math.abs(value) < 1000) return `${Math.round(value)} ${value === 1 ? "byte" : "bytes"}`;
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

export function rate(bytesPerSecond) {
  if (!bytesPerSecond) return "—";
  return `${bytes(bytesPerSecond)}/s`;
}

/** The one place a word follows a number: plural(1, "policy", "policies") -> "policy". */
export function plural(n, one, many = `${one}s`) {
  return Number(n) === 1 ? one : many;
}

/** A number and its word: count(1, "second") -> "1 second", count(1204, "file") -> "1,204 files". */
export function count(n, one, many = `${one}s`) {
  const value = Number(n || 0);
  return `${value.toLocaleString("en-US")} ${plural(value, one, many)}`;
}

/** "a", "a and b", "a, b and c". */
export function listText(items) {
  const list = (items || []).map(String);
  if (list.length <= 1) return list.join("");
  return `${list.slice(0, -1).join(", ")} and ${list[list.length - 1]}`;
}

export function percent(fraction) {
  if (!Number.isFinite(fraction)) return "—";
  const p = fraction * 100;
  return `${p >= 10 || p === 0 ? Math.round(p) : p.toFixed(1)}%`;
}

/** 1 -> "1 second"; 75 -> "1 minute 15 seconds"; 7200 -> "2 hours"; 200000 -> "2 days 7 hours". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "—";
  if (Number(seconds) < 1) return "under a second";
  let s = Math.round(Number(seconds));
  if (s < 60) return count(s, "second");
  const days = Math.floor(s / 86400);
  s -= days * 86400;
  const hours = Math.floor(s / 3600);
  s -= hours * 3600;
  const minutes = Math.floor(s / 60);
  s -= minutes * 60;
  // Two units at most: "2 days 7 hours" says enough; the minutes of it do not matter.
  if (days) return hours ? `${count(days, "day")} ${count(hours, "hour")}` : count(days, "day");
  if (hours) return minutes ? `${count(hours, "hour")} ${count(minutes, "minute")}` : count(hours, "hour");
  return s ? `${count(minutes, "minute")} ${count(s, "second")}` : count(minutes, "minute");
}

/** An RPO target in words: 3600 -> "1 hour", 86400 -> "1 day". */
export function period(seconds) {
  const s = Number(seconds || 0);
  if (!s) return "none";
  if (s % 86400 === 0) return count(s / 86400, "day");
  if (s % 3600 === 0) return count(s / 3600, "hour");
  if (s % 60 === 0) return count(s / 60, "minute");
  return count(s, "second");
}

/** How long ago, in words: "just now", "5 minutes ago", "3 days ago". */
export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Number(seconds));
  if (s < 45) return "just now";
  if (s < 90) return "a minute ago";
  if (s < 3600) return `${Math.round(s / 60)} minutes ago`;
  if (s < 5400) return "an hour ago";
  if (s < 86400) return `${Math.round(s / 3600)} hours ago`;
  if (s < 172800) return "yesterday";
  return `${Math.round(s / 86400)} days ago`;
}

export function secondsSince(iso, now = Date.now()) {
  if (!iso) return null;
  return (now - new Date(iso).getTime()) / 1000;
}

const DATE_TIME = new Intl.DateTimeFormat("en-GB", {
  day: "numeric",
  month: "short",
  year: "numeric",
  hour: "2-digit",
  minute: "2-digit",
});
const TIME = new Intl.DateTimeFormat("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const DAY = new Intl.DateTimeFormat("en-GB", { day: "numeric", month: "short" });

export function dateTime(iso) {
  if (!iso) return "—";
  return DATE_TIME.format(new Date(iso));
}

export function time(iso) {
  if (!iso) return "—";
  return TIME.format(new Date(iso));
}

export function day(dateOrIso) {
  return DAY.format(new Date(dateOrIso));
}

export function shortId(id) {
  return id ? String(id).slice(0, 8) : "";
}

export function capitalise(text) {
  const t = String(text || "");
  return t.charAt(0).toUpperCase() + t.slice(1);
}

export const ROLE_NAMES = { admin: "Administrator", operator: "Operator", viewer: "Viewer" };
export const MODE_NAMES = { full: "Full", incremental: "Incremental", differential: "Differential" };
export const STATE_NAMES = {
  queued: "Queued",
  running: "Running",
  waiting: "Waiting",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
  interrupted: "Interrupted",
};
export const LOCATION_NAMES = {
  pool_dir: "disk pool",
  block_pool: "disk pool",
  removable: "removable disk",
  tape_set: "tape",
  s3_bucket: "object storage bucket",
  pool: "disk pool",
  usb: "removable disk",
  tape: "tape",
  bucket: "object storage bucket",
  peer: "another appliance",
  unknown: "unknown place",
};

const DOW = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

function hhmm(hour, minute) {
  return `${String(hour).padStart(2, "0")}:${String(minute).padStart(2, "0")}`;
}

/** Common cron expressions in words; anything else is shown as written. */
export function describeCron(expr) {
  const text = String(expr || "").trim();
  const aliases = {
    "@hourly": "Every hour",
    "@daily": "Every day at 00:00",
    "@midnight": "Every day at 00:00",
    "@weekly": "Every Sunday at 00:00",
    "@monthly": "On the 1st of every month at 00:00",
  };
  if (aliases[text]) return aliases[text];
  const parts = text.split(/\s+/);
  if (parts.length !== 5) return text;
  const [min, hour, dom, mon, dow] = parts;
  const num = (v) => /^\d+$/.test(v);
  if (mon !== "*") return `Cron: ${text}`;
  if (num(min) && hour === "*" && dom === "*" && dow === "*") {
    return min === "0" ? "Every hour" : `Every hour at :${min.padStart(2, "0")}`;
  }
  const step = /^\*\/(\d+)$/;
  if (step.test(min) && hour === "*" && dom === "*" && dow === "*") {
    return `Every ${min.match(step)[1]} minutes`;
  }
  if (num(min) && step.test(hour) && dom === "*" && dow === "*") {
    return `Every ${hour.match(step)[1]} hours`;
  }
  if (num(min) && num(hour) && dom === "*" && dow === "*") return `Every day at ${hhmm(hour, min)}`;
  if (num(min) && num(hour) && dom === "*" && num(dow)) {
    return `Every ${DOW[Number(dow) % 7]} at ${hhmm(hour, min)}`;
  }
  if (num(min) && num(hour) && dom === "*" && dow === "1-5") {
    return `Weekdays at ${hhmm(hour, min)}`;
  }
  if (num(min) && num(hour) && num(dom) && dow === "*") {
    return `Day ${dom} of every month at ${hhmm(hour, min)}`;
  }
  return `Cron: ${text}`;
}

const AUDIT_ACTIONS = {
  login: "Signed in",
  "login.failed": "Failed sign-in",
  logout: "Signed out",
  "setup.admin": "Created the first administrator",
  "asset.create": "Added an asset",
  "asset.update": "Changed an asset",
  "asset.delete": "Deleted an asset",
  "asset.backup": "Started a backup",
  "policy.create": "Added a policy",
  "policy.update": "Changed a policy",
  "policy.delete": "Deleted a policy",
  "policy.run": "Ran a policy",
  "point.download": "Downloaded from a point",
  "point.restore": "Started a restore",
  "point.copy": "Started a copy to a location",
  "location.add": "Added a location",
  "location.remove": "Removed a location",
  "settings.restore": "Changed where restores may go",
  "point.verify": "Started a verification",
  "point.delete": "Deleted a point",
  "job.cancel": "Cancelled a job",
  "job.retry": "Retried a job",
  "user.create": "Added a user",
  "user.update": "Changed a user",
  "user.delete": "Deleted a user",
  "user.password": "Changed a password",
  "token.create": "Created an API token",
  "token.revoke": "Revoked an API token",
  "token.renew": "Changed the expiry of an API token",
  "token.refused": "Refused an API token",
  "settings.update": "Changed settings",
  "store.verify": "Started a store verification",
  "store.gc": "Started garbage collection",
  "retention.prune": "Pruned points",
  "catalog.rebuild": "Rebuilt the catalog",
  "key.export": "Viewed the recovery key",
  "recovery_key.show": "Viewed the recovery key",
  "recovery_key.confirm": "Confirmed keeping the recovery key",
  "network.update": "Changed the network",
  "time.update": "Changed the time settings",
  "security_updates.update": "Changed automatic security updates",
};

export function auditAction(action) {
  return AUDIT_ACTIONS[action] || capitalise(String(action).replace(/[._]/g, " "));
}

/** A job's one-line summary of its progress: "12 files · 3.2 MB · 5.1 MB/s · 4 s left". */
export function progressSummary(progress, state) {
  const p = progress || {};
  const parts = [];
  if (p.disk) parts.push(`disk ${p.disk}`);
  if (p.files !== undefined) parts.push(count(p.files, "file"));
  if (p.bytes_done !== undefined) {
    parts.push(p.bytes_total ? `${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}` : bytes(p.bytes_done));
  }
  if (state === "running" && p.rate) parts.push(rate(p.rate));
  if (state === "running" && p.eta !== undefined && p.bytes_total) parts.push(`about ${duration(p.eta)} left`);
  return parts.join(" · ");
}
