// The page's only way to talk to the appliance: the same JSON API scripts use, under /api.
//
// Signing in sets two cookies: the session (HttpOnly, the page never sees it) and the CSRF token
// (readable). Every state-changing request copies the CSRF cookie into the X-CSRF-Token header;
// another site can make a browser send the cookies but cannot read them to build that header.
// Errors come back as {code, message, details}; humanError() turns them into sentences.

const CSRF_COOKIE = "appliance_csrf";
const CSRF_HEADER = "X-CSRF-Token";
const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === CSRF_COOKIE) return decodeURIComponent(rest.join("="));
  }
  return "";
}

/** Called with the error when a request finds the session gone (the page shows sign-in). */
let onSessionEnded = null;
export function whenSessionEnds(callback) {
  onSessionEnded = callback;
}

// --- the store context: working on a taken-over source's store -----------------------------------
//
// After a take-over (docs/replication.md), the Points and Failover screens work on another
// appliance's store held here. The router sets the context from the address ("#/points?store=<id>");
// it then stays until the user goes back to this appliance (the banner every screen shows), and
// every API request carries `store=<id>`, except those about this appliance itself (sessions,
// users, settings, peers and replication), which have no store. Kept in sessionStorage so a
// reload stays in the same context.

const STORE_KEY = "appliance.store-context";
const APPLIANCE_PATHS = /^\/api\/(me|login|logout|setup|settings|health|users|tokens|audit|peers|replication)(\/|$)/;
let storeContext = null;
try {
  storeContext = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
} catch {
  storeContext = null;
}

/** The store being worked on: {id, name} of a taken-over source, or null (this appliance's). */
export function currentStore() {
  return storeContext;
}

/** Work on a taken-over store ({id, name}), or on this appliance's own again (null). */
export function setStore(context) {
  storeContext = context && context.id ? { id: String(context.id), name: context.name || null } : null;
  try {
    if (storeContext) sessionStorage.setItem(STORE_KEY, JSON.stringify(storeContext));
    else sessionStorage.removeItem(STORE_KEY);
  } catch {
    // private windows may refuse storage: the context then lasts until a reload
  }
}

/** `path` with `store=<id>` added while a store context is set (and the path concerns a store). */
export function scoped(path) {
  if (!storeContext || !String(path).startsWith("/api/")) return path;
  const url = new URL(path, window.location.origin);
  if (APPLIANCE_PATHS.test(url.pathname) || url.searchParams.has("store")) return path;
  url.searchParams.set("store", storeContext.id);
  return `${url.pathname}${url.search}`;
}

export async function request(method, path, body, { quietAuth = false } = {}) {
  path = scoped(path);
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (!SAFE.has(method)) {
    const token = csrfToken();
    if (token) headers[CSRF_HEADER] = token;
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "network", "cannot reach the appliance");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const err = new ApiError(
      response.status,
      (data && data.code) || `http_${response.status}`,
      (data && data.message) || response.statusText || "request failed",
      data && data.details,
    );
    const retryAfter = response.headers.get("Retry-After");
    if (retryAfter && err.details.retry_after === undefined) err.details.retry_after = Number(retryAfter);
    if (response.status === 401 && err.code === "unauthenticated" && !quietAuth && onSessionEnded) {
      onSessionEnded(err);
    }
    throw err;
  }
  return data;
}

export const api = {
  get: (path, opts) => request("GET", path, undefined, opts),
  post: (path, body = {}, opts) => request("POST", path, body, opts),
  put: (path, body = {}, opts) => request("PUT", path, body, opts),
  patch: (path, body = {}, opts) => request("PATCH", path, body, opts),
  del: (path, opts) => request("DELETE", path, undefined, opts),
};

export function q(path, params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `${path}?${text}` : path;
}

export const enc = encodeURIComponent;

/** Server-sent events: onEvent(kind, data) for every event; returns a function that closes. */
export function subscribe(path, handlers) {
  const source = new EventSource(scoped(path), { withCredentials: true });
  for (const [kind, handler] of Object.entries(handlers)) {
    if (kind === "open") source.addEventListener("open", () => handler());
    else if (kind === "error") source.addEventListener("error", () => handler(source.readyState));
    else {
      source.addEventListener(kind, (event) => {
        let data = null;
        try {
          data = JSON.parse(event.data);
        } catch {
          return;
        }
        handler(data, event);
      });
    }
  }
  return () => source.close();
}

// --- errors in words -----------------------------------------------------------------------------

const FIELD_LABELS = {
  name: "Name",
  password: "Password",
  new_password: "New password",
  current_password: "Current password",
  path: "Folder",
  disks: "Disk images",
  vm_spec: "VM definition",
  description: "Description",
  target: "Restore to",
  cron: "Schedule",
  mode: "Backup mode",
  asset: "Asset",
  rpo_seconds: "RPO target",
  role: "Role",
  user: "User",
  setup_code: "Set-up code",
  keep_last: "Keep last",
  keep_hourly: "Keep hourly",
  keep_daily: "Keep daily",
  keep_weekly: "Keep weekly",
  keep_monthly: "Keep monthly",
  keep_yearly: "Keep yearly",
  address: "Bucket",
  endpoint_url: "Endpoint",
  region: "Region",
  access_key_id: "Access key",
  secret_access_key: "Secret key",
  lock_days: "Days locked",
  lock_mode: "Object Lock",
  data_class: "Data class",
  restore_tier: "Restore tier",
};

function fieldOf(loc) {
  const names = (loc || []).filter((part) => typeof part === "string" && part !== "body");
  return names.length ? names[names.length - 1] : null;
}

function validationSentence(error) {
  const field = fieldOf(error.loc);
  const label = FIELD_LABELS[field] || (field ? field.replace(/_/g, " ") : "A field");
  const type = error.type || "";
  const message = String(error.message || "").replace(/^Value error, /, "");
  if (type === "missing") return `${label} is required.`;
  if (type === "string_pattern_mismatch") {
    if (["path", "target", "vm_spec", "disks"].includes(field) || (error.loc || []).includes("disks")) {
      return `${label} must be a full path that starts with “/”.`;
    }
    return `${label} may use only letters, digits, dots, dashes and underscores, and must start with a letter or digit (at most 64 characters).`;
  }
  if (type === "string_too_short") {
    const min = /at least (\d+)/.exec(message);
    return min ? `${label} must be at least ${min[1]} characters long.` : `${label} is required.`;
  }
  if (type === "string_too_long") return `${label} is too long.`;
  if (type.startsWith("greater_than") || type.startsWith("less_than")) return `${label}: ${message.toLowerCase()}.`;
  if (type === "int_parsing" || type === "int_type") return `${label} must be a whole number.`;
  if (type === "literal_error") return `${label} is not one of the allowed choices.`;
  if (type === "extra_forbidden") return `${label} is not expected here.`;
  // A rule across fields (a bucket's options that do not fit together) says it all itself.
  if (type === "value_error" && (!field || field === "bucket")) return sentence(message);
  return `${label}: ${message}`;
}

function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return "";
  const first = t.charAt(0).toUpperCase() + t.slice(1);
  return /[.!?]$/.test(first) ? first : `${first}.`;
}

/** What went wrong, for a person: {title, text, field}. */
export function humanError(err) {
  if (!(err instanceof ApiError)) {
    return { title: "Something went wrong", text: sentence(err && err.message ? err.message : String(err)) };
  }
  const d = err.details || {};
  switch (err.code) {
    case "network":
      return {
        title: "The appliance cannot be reached",
        text: "Check that the service is running and that this computer can reach it, then try again.",
      };
    case "invalid_credentials":
      return { title: "Sign-in failed", text: sentence(err.message === "the current password is wrong" ? err.message : "The user name or password is wrong") };
    case "login_throttled": {
      const wait = d.retry_after ? Math.ceil(d.retry_after) : null;
      return {
        title: "Too many failed sign-ins",
        text: wait ? `For your safety, sign-in is paused. Try again in ${wait} seconds.` : "For your safety, sign-in is paused for a while. Try again later.",
      };
    }
    case "unauthenticated":
      return { title: "Please sign in", text: "Your session has ended. Sign in again to continue." };
    case "csrf_failed":
      return {
        title: "The page's security check failed",
        text: "Reload the page and try again. This happens when the page was open while you signed in elsewhere.",
      };
    case "forbidden":
      if (d.needed) {
        return {
          title: "Not allowed for your role",
          text: `This needs the ${d.needed} role; you are signed in as ${d.role || "a user with fewer rights"}. Ask an administrator.`,
        };
      }
      return { title: "Not allowed", text: sentence(err.message) };
    case "validation_error": {
      const errors = Array.isArray(d.errors) ? d.errors : [];
      const first = errors[0];
      return {
        title: "Please check the form",
        text: first ? validationSentence(first) : sentence(err.message),
        field: first ? fieldOf(first.loc) : null,
      };
    }
    case "invalid_input":
    case "invalid_name":
    case "source_error":
    case "unsafe_restore_path":
      return { title: "Please check the details.", text: sentence(err.message), field: d.field || (typeof d.path === "string" ? "path" : null) };
    case "location_refused":
      return { title: "The location could not be added", text: sentence(err.message) };
    case "path_refused":
      return { title: "That place is not allowed", text: sentence(err.message), field: d.field || null };
    case "not_found":
      return { title: "Not found", text: `${sentence(err.message)} It may have been deleted; reload the page.` };
    case "conflict":
    case "lock_held":
      return { title: "Not possible right now", text: sentence(err.message) };
    case "store_full":
      return { title: "The pool is full", text: `${sentence(err.message)} Free space by pruning old points and running garbage collection.` };
    case "internal_error":
      return { title: "The appliance hit an unexpected error", text: "Nothing was changed. The service's log has the details." };
    default:
      if (err.status >= 500) {
        return { title: "The appliance hit an error", text: sentence(err.message) || "See the service's log for details." };
      }
      return { title: "That did not work.", text: sentence(err.message) };
  }
}
