// Failover in words: the states, outcomes, proofs and settings of failover sessions as the
// failover screens show them (views/failover.js), and the timings those screens poll at.

import { enc } from "../api.js";
import { h } from "../dom.js";
import { bytes, capitalise, duration, shortId } from "../format.js";

export const ACTIVE = new Set(["starting", "booting", "running", "migrating", "stopping"]);
export const JOB_DONE = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
export const SESSION_POLL_MS = 2500;
export const PICTURE_MS = 3000;
export const JOB_POLL_MS = 1500;
export const PENDING_POLL_MS = 1000;

export const PURPOSE_NAMES = { failover: "Failover", boot_test: "Boot test" };
export const CHECK_NAMES = { serial: "serial console", tcp: "TCP port", http: "health page", agent: "guest agent", screen: "screen stopped changing" };
export const STOPPED_BY = {
  "powered off": "the guest shut down when asked",
  quit: "QEMU was told to quit",
  killed: "QEMU was killed (the guest did not shut down in time)",
  "already stopped": "it had already stopped",
};

// --- words for a session ---------------------------------------------------------------------------

/** "boot proof failed after 120 s: serial console never printed ..." -> the part that says which check. */
export function failedReason(error) {
  const text = String(error || "").trim();
  if (!text) return "the reason was not recorded";
  const proof = /^boot proof failed after [^:]+:\s*(.*)$/s.exec(text);
  return proof ? proof[1] : text;
}

/** {label, tone, text}: the state as a person says it. */
export function stateWords(info) {
  const d = info.details || {};
  const test = info.purpose === "boot_test";
  switch (info.state) {
    case "starting":
      return { label: "Preparing", tone: "info", text: "Checking the recovery point and exporting its disks from the store." };
    case "booting":
      return { label: "Booting", tone: "info", text: "The VM is starting from the backup; waiting for the boot proof." };
    case "running":
      if (info.storage === "local") return { label: "Running on local disk", tone: "good", text: "Its disks were copied to the appliance's local storage; the VM no longer needs the backup." };
      return { label: "Running from backup", tone: "good", text: "The VM runs on this appliance; its disks are read from the backup and its writes kept apart." };
    case "migrating":
      return { label: "Moving to local disk", tone: "info", text: "Copying the disks off the backup while the VM keeps running." };
    case "stopping":
      return { label: "Stopping", tone: "warn", text: "Powering the VM down." };
    case "stopped": {
      const how = STOPPED_BY[d.stopped_by] || d.stopped_by;
      if (test) return { label: "Boot test passed", tone: "good", text: "The point booted and was proven; the test VM was shut down and discarded." };
      return { label: "Stopped", tone: "neutral", text: how ? `The VM is off: ${how}.` : "The VM is off." };
    }
    case "failed":
      return { label: `Failed: ${failedReason(d.error || info.error)}`, tone: "bad", text: test ? "The boot test did not prove the boot." : "The failover did not complete." };
    default:
      return { label: capitalise(info.state), tone: "neutral", text: "" };
  }
}

export function shortLabel(info) {
  return info.state === "failed" ? "Failed" : stateWords(info).label;
}

export function rtoText(seconds) {
  if (seconds === null || seconds === undefined) return null;
  const s = Number(seconds);
  return s < 60 ? `${s.toFixed(1)} s` : duration(s);
}

export function accelText(accel) {
  if (accel === "kvm") return "KVM (hardware virtualisation)";
  if (accel === "tcg") return "TCG (software emulation, slower)";
  return accel ? String(accel).toUpperCase() : "—";
}

export function storageText(info) {
  const d = info.details || {};
  if (info.storage === "local") {
    const paths = Object.values(d.local_disks || {});
    return `Local disk${paths.length ? ` (${paths.join(", ")})` : ""}`;
  }
  return info.state === "stopped" || info.state === "failed" ? "Backup (disks read from the store)" : "Backup: disks read from the store, writes kept in an overlay";
}

/** [{guest, host}] of an isolated failover's port forwards. */
export function forwards(info) {
  return Object.entries(info.ports || {})
    .map(([guest, host]) => ({ guest: Number(guest), host: Number(host) }))
    .sort((a, b) => a.guest - b.guest);
}

export function healthUrl(info) {
  const proof = (info.details || {}).proof || {};
  if (!proof.http_port) return null;
  const host = (info.ports || {})[String(proof.http_port)];
  if (!host) return proof.address ? `http://${proof.address}:${proof.http_port}${proof.http_path || "/"}` : null;
  return `http://127.0.0.1:${host}${proof.http_path || "/"}`;
}

export function proofText(proof) {
  if (!proof) return null;
  const parts = [];
  if (proof.serial) parts.push(`serial console prints “${proof.serial}”`);
  if (proof.tcp) parts.push(`TCP port ${proof.tcp} answers`);
  if (proof.http_port) parts.push(`the page ${proof.http_path || "/"} on HTTP port ${proof.http_port} answers${proof.http_expect ? ` with “${proof.http_expect}”` : ""}`);
  if (proof.agent) parts.push("the guest agent answers");
  if (proof.screen_stable) parts.push(`the screen stops changing for ${proof.screen_stable} s`);
  return parts.length ? parts.join("; ") : null;
}

export function checksText(checks) {
  const entries = Object.entries(checks || {});
  if (!entries.length) return null;
  return entries.map(([name, at]) => `${CHECK_NAMES[name] || name} after ${Number(at).toFixed(1)} s`).join(", ");
}

/** What the VM read through the export: guest bytes, and what that cost the store. */
export function readText(stats) {
  if (!stats || stats.bytes_served === undefined) return null;
  const sealed = stats.bytes_from_store ? `; ${bytes(stats.bytes_from_store)} read from the store's packs` : "";
  return `${bytes(stats.bytes_served)} of disk data in ${Number(stats.reads || 0).toLocaleString("en-US")} reads${sealed}`;
}

export function pointLink(pointId) {
  return h("a", { href: `#/points/${enc(pointId)}`, class: "mono", text: shortId(pointId) });
}

// --- the list ----------------------------------------------------------------------------------------

/** The failover screen: every session, newest first; with ?job=, the failover being started. */