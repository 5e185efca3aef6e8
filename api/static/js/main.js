// The admin page: decides between first-run, sign-in and the app, draws the layout (sidebar and
// header) and routes "#/..." addresses to the screens in views/.

import { api, currentStore, humanError, setStore, whenSessionEnds } from "./api.js";
import { clear, h, icon, replace } from "./dom.js";
import { ROLE_NAMES, count } from "./format.js";
import { ALERTS_CHANGED, bannerSlot } from "./ui.js";
import { renderFirstRun, renderLogin } from "./views/auth.js";
import dashboard from "./views/dashboard.js";
import report from "./views/report.js";
import assets from "./views/assets.js";
import points from "./views/points.js";
import browse from "./views/browse.js";
import { jobDetail, jobList } from "./views/jobs.js";
import { failoverList, failoverSession } from "./views/failover.js";
import failoverSettings from "./views/failover_settings.js";
import plansView, { planDetail } from "./views/plans.js";
import pools from "./views/pools.js";
import disks from "./views/disks.js";
import media from "./views/media.js";
import tape from "./views/tape.js";
import tiering from "./views/tiering.js";
import replication from "./views/replication.js";
import hosts from "./views/hosts.js";
import users from "./views/users.js";
import audit from "./views/audit.js";
import settingsView from "./views/settings.js";
import alertsView from "./views/alerts.js";
import firstRunView from "./views/firstrun.js";

const RANK = { viewer: 0, operator: 1, admin: 2 };
// The Alerts entry's badge (open, unacknowledged alerts) is read this often, on every screen
// change, and when a screen says it changed alerts (ALERTS_CHANGED, e.g. an acknowledge).
const BADGE_SECONDS = 30;

const NAV = [
  { href: "#/", label: "Dashboard", iconName: "dashboard", match: /^\/$/ },
  { href: "#/assets", label: "Assets & policies", iconName: "assets", match: /^\/assets/ },
  { href: "#/hosts", label: "Hosts", iconName: "disk", match: /^\/hosts/ },
  { href: "#/points", label: "Recovery points", iconName: "points", match: /^\/points/ },
  { href: "#/failover", label: "Failover", iconName: "play", match: /^\/failover/ },
  { href: "#/plans", label: "Recovery plans", iconName: "check", match: /^\/plans/ },
  { href: "#/jobs", label: "Jobs", iconName: "jobs", match: /^\/jobs/ },
  { href: "#/alerts", label: "Alerts", iconName: "alert", match: /^\/alerts/ },
  { href: "#/pools", label: "Pools & disks", iconName: "pools", match: /^\/(pools|disks|media)/ },
  { href: "#/tape", label: "Tape", iconName: "disk", match: /^\/tape/ },
  { href: "#/tiering", label: "Tiering", iconName: "copy", match: /^\/tiering/ },
  { href: "#/replication", label: "Replication", iconName: "link", match: /^\/replication/ },
  { href: "#/users", label: "Users & tokens", iconName: "users", match: /^\/users/, role: "admin" },
  { href: "#/audit", label: "Audit log", iconName: "audit", match: /^\/audit/, role: "admin" },
  { href: "#/settings", label: "Settings", iconName: "settings", match: /^\/settings/, role: "admin" },
];

const ROUTES = [
  [/^\/$/, dashboard, "Dashboard"],
  [/^\/report$/, report, "Weekly protection report"],
  [/^\/assets$/, assets, "Assets & policies"],
  [/^\/hosts$/, hosts, "Hosts"],
  [/^\/points$/, points, "Recovery points"],
  [/^\/points\/([^/]+)$/, browse, "Browse a point"],
  [/^\/assets\/([^/]+)\/failover-settings$/, failoverSettings, "Failover settings"],
  [/^\/failover$/, failoverList, "Failover"],
  [/^\/failover\/([^/]+)$/, failoverSession, "Failover session"],
  [/^\/plans$/, plansView, "Recovery plans"],
  [/^\/plans\/([^/]+)$/, planDetail, "Recovery plan"],
  [/^\/jobs$/, jobList, "Jobs"],
  [/^\/jobs\/([^/]+)$/, jobDetail, "Job"],
  [/^\/alerts$/, alertsView, "Alerts"],
  [/^\/pools$/, pools, "Storage: pools"],
  [/^\/disks$/, disks, "Storage: disks"],
  [/^\/media$/, media, "Storage: USB disks"],
  [/^\/tape$/, tape, "Tape"],
  [/^\/tiering$/, tiering, "Tiering"],
  [/^\/replication$/, replication, "Replication"],
  [/^\/users$/, users, "Users & tokens", "admin"],
  [/^\/audit$/, audit, "Audit log", "admin"],
  [/^\/settings$/, settingsView, "Settings", "admin"],
  [/^\/first-run(?:\/([a-z-]+))?$/, firstRunView, "Set up the appliance", "admin"],
];

const app = document.getElementById("app");
const state = { session: null, applianceName: "Backup appliance", version: "", disposers: [], shell: null, generation: 0, badgeTimer: null };

export function can(role) {
  return Boolean(state.session) && RANK[state.session.role] >= RANK[role];
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = raw.split("?");
  return { path: path || "/", query: new URLSearchParams(search) };
}

export function navigate(href) {
  if (location.hash === href) route();
  else location.hash = href;
}

function dispose() {
  state.generation += 1;
  for (const fn of state.disposers.splice(0)) {
    try {
      fn();
    } catch {
      // a screen's clean-up must never break the next screen
    }
  }
}

// --- the layout --------------------------------------------------------------------------------------

function buildShell() {
  const { session } = state;
  const alertBadge = h("span", { class: "nav-badge", hidden: true, dataset: { count: "0" } });
  const nav = h(
    "nav",
    { class: "nav", "aria-label": "Main" },
    h(
      "ul",
      NAV.filter((item) => !item.role || can(item.role)).map((item) =>
        h("li", h("a", { href: item.href, class: "nav-link", dataset: { match: item.match.source } }, icon(item.iconName), h("span", { text: item.label }), item.href === "#/alerts" ? alertBadge : null)),
      ),
    ),
  );
  const signOut = h("button", { type: "button", class: "btn btn-ghost signout", onClick: logout }, icon("logout"), h("span", { text: "Sign out" }));
  const main = h("main", { class: "main", id: "main", tabindex: "-1" });
  const shell = h(
    "div",
    { class: "shell" },
    h("a", { href: "#main", class: "skip", text: "Skip to content" }),
    h(
      "aside",
      { class: "sidebar" },
      h("a", { href: "#/", class: "brand", "aria-label": "Dashboard" }, h("span", { class: "brand-mark" }, icon("shield")), h("span", { class: "brand-text" }, h("strong", { text: "Appliance" }), h("small", { text: "Backup & recovery" }))),
      nav,
      h("p", { class: "sidebar-foot", text: state.version ? `Version ${state.version}` : "" }),
    ),
    h(
      "header",
      { class: "topbar" },
      h("div", { class: "topbar-title" }, h("span", { class: "appliance-name", text: state.applianceName })),
      h(
        "div",
        { class: "user", "aria-label": "Signed in user" },
        h("span", { class: "avatar", "aria-hidden": "true", text: session.name.charAt(0).toUpperCase() }),
        h("span", { class: "user-text" }, h("strong", { class: "user-name", text: session.name }), h("small", { class: "user-role", text: ROLE_NAMES[session.role] || session.role })),
        signOut,
      ),
    ),
    main,
  );
  state.shell = { el: shell, main, nav, alertBadge };
  replace(app, shell);
  stopBadge();
  state.badgeTimer = setInterval(refreshAlertBadge, BADGE_SECONDS * 1000);
}

/** Show the number of open, unacknowledged alerts on the Alerts entry (hidden at 0), in the
 * colour of the most severe; a failed read leaves the last number (the next poll tries again). */
async function refreshAlertBadge() {
  const shell = state.shell;
  if (!shell || !state.session) return;
  let counts;
  try {
    counts = await api.get("/api/alerts/counts");
  } catch {
    return;
  }
  if (shell !== state.shell) return; // signed out or rebuilt meanwhile
  const badge = shell.alertBadge;
  const total = Number(counts.total || 0);
  const tone = counts.critical ? "bad" : counts.warning ? "warn" : "info";
  badge.hidden = !total;
  badge.className = `nav-badge nav-badge-${tone}`;
  badge.dataset.count = String(total);
  badge.title = total ? `${count(total, "open alert")} not acknowledged` : "";
  replace(badge, h("span", { class: "nav-badge-n", text: total > 99 ? "99+" : String(total) }), h("span", { class: "sr-only", text: ` open ${total === 1 ? "alert" : "alerts"}` }));
}

function stopBadge() {
  if (state.badgeTimer) clearInterval(state.badgeTimer);
  state.badgeTimer = null;
}

window.addEventListener(ALERTS_CHANGED, () => refreshAlertBadge());

function markNav(path) {
  if (!state.shell) return;
  for (const link of state.shell.nav.querySelectorAll(".nav-link")) {
    const active = new RegExp(link.dataset.match).test(path);
    link.classList.toggle("active", active);
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** An address with `store=<id>` works on a taken-over store from then on (api.js setStore). */
function enterStore(id) {
  const known = currentStore();
  setStore({ id, name: known && known.id === id ? known.name : null });
}

/** While a taken-over store is worked on, every screen says so first, with the way back. */
function storeBanner() {
  const store = currentStore();
  if (!store) return null;
  const whose = store.name ? `${store.name}'s store` : `the store ${store.id.slice(0, 8)}`;
  const back = h("a", {
    href: "#/replication",
    text: "back to this appliance",
    onClick: (event) => {
      event.preventDefault();
      setStore(null);
      navigate("#/replication");
    },
  });
  return h("div", { class: "banner banner-warning store-banner", role: "status" }, icon("alert", "banner-icon"), h("div", { class: "banner-body" }, h("strong", { text: `Working on ${whose} (taken over)` }), " — ", back));
}

async function route() {
  if (!state.session) return;
  if (!state.shell) buildShell();
  dispose();
  const generation = state.generation;
  const { path, query } = parseHash();
  if (query.get("store")) enterStore(query.get("store"));
  markNav(path);
  refreshAlertBadge();
  const main = state.shell.main;
  const banner = bannerSlot();
  const content = h("div", { class: "content" });
  replace(main, storeBanner(), banner.el, content);
  const found = ROUTES.map(([re, render, title, role]) => ({ m: re.exec(path), render, title, role })).find((r) => r.m);
  if (!found) {
    content.appendChild(h("div", { class: "empty" }, h("p", { class: "empty-title", text: "This page does not exist" }), h("a", { href: "#/", class: "btn", text: "Go to the dashboard" })));
    return;
  }
  document.title = `${found.title} · ${state.applianceName}`;
  if (found.role && !can(found.role)) {
    banner.show("error", "Not allowed for your role", `This screen is for the ${found.role} role; you are signed in as ${state.session.role}.`);
    return;
  }
  const view = {
    el: content,
    banner,
    params: found.m.slice(1).map(decodeURIComponent),
    query,
    session: state.session,
    can,
    navigate,
    // a screen left while it was still loading cleans up at once
    onDispose: (fn) => (generation === state.generation ? state.disposers.push(fn) : fn()),
    setTitle: (title) => {
      document.title = `${title} · ${state.applianceName}`;
    },
  };
  try {
    await found.render(view);
  } catch (err) {
    banner.error(err);
  }
  window.scrollTo(0, 0);
}

// --- signing in and out ----------------------------------------------------------------------------

async function loadContext() {
  const [settings, health] = await Promise.allSettled([api.get("/api/settings"), api.get("/api/health")]);
  if (settings.status === "fulfilled") state.applianceName = settings.value.appliance_name;
  if (health.status === "fulfilled") state.version = health.value.version;
}

async function signedIn(session) {
  state.session = { name: session.name, role: session.role, via: session.via };
  state.shell = null;
  await loadContext();
  route();
}

async function logout() {
  try {
    await api.post("/api/logout", undefined, { quietAuth: true });
  } catch {
    // signed out already: show the sign-in screen all the same
  }
  showLogin({ kind: "info", title: "You have signed out.", text: "" });
}

function showLogin(notice = null) {
  dispose();
  stopBadge();
  setStore(null);
  state.session = null;
  state.shell = null;
  document.title = `Sign in · ${state.applianceName}`;
  renderLogin(app, { notice, onSignedIn: signedIn });
}

whenSessionEnds(() => {
  if (state.session) showLogin({ kind: "info", title: "Your session has ended.", text: "Sign in again to continue." });
});

async function boot() {
  try {
    const setup = await api.get("/api/setup");
    if (!setup.admin_exists) {
      document.title = `Welcome · ${state.applianceName}`;
      renderFirstRun(app, { codeRequired: setup.setup_code_required, codeFile: setup.setup_code_file, onSignedIn: signedIn });
      return;
    }
    let me;
    try {
      me = await api.get("/api/me", { quietAuth: true });
    } catch (err) {
      if (err.status === 401) {
        showLogin();
        return;
      }
      throw err;
    }
    await signedIn(me);
  } catch (err) {
    const { title, text } = humanError(err);
    clear(app);
    const retry = h("button", { type: "button", class: "btn btn-primary", text: "Try again", onClick: () => boot() });
    app.appendChild(h("div", { class: "auth" }, h("div", { class: "auth-card", role: "alert" }, h("h1", { text: title }), h("p", { text }), retry)));
  }
}

window.addEventListener("hashchange", route);
boot();
