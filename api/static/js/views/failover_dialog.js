// The dialog behind "Fail over" and "Boot test": which point of the VM boots, and (for a
// failover) on which network. The points come from GET /api/assets/{name}/failover-points; the
// one the appliance would boot by itself is preselected (the newest, unless it failed or missed
// its check: then the dialog says why in words). Confirm starts the job with the chosen point
// named, so what boots is what was shown; the failover screen then follows the job.
//
// openFailoverDialog(view, asset, purpose): asset is the asset object (or its name); purpose is
// "failover" or "boot_test" (always isolated: the network picker only says so).

import { ApiError, api, enc } from "../api.js";
import { h, replace } from "../dom.js";
import { ago, bytes, capitalise, dateTime, listText, MODE_NAMES } from "../format.js";
import { formDialog, loading, pill } from "../ui.js";
import { networkPicker } from "./network_picker.js";

const VERIFY_WORDS = {
  ok: ["Checked", "good", "Every chunk is in the store and every pack it lies in is intact."],
  damaged: ["Failed its check", "bad", "Part of this point is missing or damaged: it may not boot."],
  none: ["Not checked yet", "warn", "This point has not been checked since its backup."],
};

function verifyPill(point) {
  const [label, tone, help] = VERIFY_WORDS[point.verify_status] || VERIFY_WORDS.none;
  const when = point.verified_at ? ` (${dateTime(point.verified_at)})` : "";
  return pill(label, tone, `${help}${when}`);
}

function proofText(proof) {
  if (!proof) return "Never test-booted";
  const when = ago((Date.now() - new Date(proof.at).getTime()) / 1000);
  if (proof.state === "proven") return `Booted ${when}${proof.rto_seconds ? `, in ${proof.rto_seconds.toFixed(1)} s` : ""}`;
  return `Boot test failed ${when}${proof.failed_check ? `: ${proof.failed_check}` : ""}`;
}

function copiesText(point) {
  const places = point.copies.map((c) => (c.state === "present" ? c.location : `${c.location} (${c.state})`));
  return places.length ? `Kept on ${listText(places)}` : "No copy online";
}

/** Why the preselected point is not simply the newest one, in plain words (local times). */
export function reasonText(info, name) {
  const byId = Object.fromEntries(info.points.map((p) => [p.id, p]));
  const newest = byId[info.newest];
  const chosen = byId[info.chosen];
  if (!newest || !chosen || info.why === "newest_ok") return null;
  const newestAt = dateTime(newest.created_at);
  const chosenAt = dateTime(chosen.created_at);
  const problem = newest.verify_problem ? `: ${newest.verify_problem}` : "";
  if (info.why === "newest_failed") return `The newest point (${newestAt}) failed its check${problem}. The point of ${chosenAt} is chosen instead.`;
  if (info.why === "newest_unverified") return `The newest point (${newestAt}) has not been checked yet. The newest checked point, of ${chosenAt}, is chosen instead.`;
  if (info.why === "none_verified") {
    if (chosen.id === newest.id) return `No point of ${name} has been checked yet. The newest one, of ${chosenAt}, is chosen.`;
    return `No point of ${name} has been checked yet, and the newest one (${newestAt}) failed its check${problem}. The point of ${chosenAt} is chosen instead.`;
  }
  return `Every point of ${name} failed its check. The newest one, of ${chosenAt}, is tried anyway.`;
}

function pointChoice(point, info) {
  const tags = [];
  if (point.id === info.newest) tags.push(pill("Newest", "info"));
  if (point.id === info.chosen && point.id !== info.newest) tags.push(pill("Chosen by the appliance", "neutral"));
  return h(
    "label",
    { class: "radio fd-point", dataset: { point: point.id } },
    h("input", { type: "radio", name: "point", value: point.id, checked: point.id === info.chosen }),
    h(
      "span",
      h("strong", { text: `${dateTime(point.created_at)} · ${capitalise(ago(point.age_seconds))}` }, h("span", { class: "mono muted small fd-id", text: ` ${point.id}` })),
      h("span", { class: "fd-tags" }, verifyPill(point), tags),
      point.verify_status === "damaged" && point.verify_problem ? h("small", { class: "error-text", text: capitalise(point.verify_problem) }) : null,
      h("small", { class: "muted fd-proof", text: proofText(point.boot_proof) }),
      h("small", { class: "muted", text: `${MODE_NAMES[point.mode] || point.mode} backup, ${bytes(point.logical_bytes)} · ${copiesText(point)}` }),
    ),
  );
}

export async function openFailoverDialog(view, asset, purpose) {
  const name = typeof asset === "string" ? asset : asset.name;
  const test = purpose === "boot_test";
  const pointsBox = h("div", { class: "fd-points" }, loading("Reading the points…"));
  const reasonBox = h("div", { class: "fd-reason" });
  const picker = networkPicker(asset, { purpose: test ? "boot_test" : "failover" });
  let info = null;
  const { banner } = formDialog({
    title: test ? `Boot test of ${name}` : `Fail over ${name}`,
    description: test
      ? `The point boots on this appliance, cut off from every network, until it is proven to work; then it is shut down and thrown away. ${name} itself is not touched.`
      : `The point boots on this appliance straight from the backup, in about the time ${name} takes to start.`,
    submitLabel: test ? "Start the boot test" : "Fail over",
    wide: true,
    body: h("div", h("fieldset", { class: "field" }, h("legend", { class: "label", text: "Point to boot" }), reasonBox, pointsBox), picker.element),
    onSubmit: async (form) => {
      const checked = form.querySelector("input[name=point]:checked");
      if (!checked) throw new ApiError(400, "invalid_input", info && !info.points.length ? `${name} has no backup to boot yet; back it up first` : "choose the point to boot");
      const body = { point: checked.value };
      const network = picker.value();
      if (!test && network) body.network = network;
      const job = await api.post(`/api/assets/${enc(name)}/${test ? "boot-test" : "failover"}`, body);
      // The failover screen follows the job and opens the session as soon as it exists.
      view.navigate(`#/failover?job=${enc(job.id)}`);
    },
  });
  try {
    info = await api.get(`/api/assets/${enc(name)}/failover-points`);
  } catch (err) {
    replace(pointsBox);
    banner.error(err);
    return;
  }
  if (!info.points.length) {
    replace(pointsBox, h("p", { class: "muted", text: `${name} has no backup to boot yet. Back it up first.` }));
    return;
  }
  const reason = reasonText(info, name);
  replace(reasonBox, reason ? h("p", { class: "banner banner-warning fd-why", role: "note", text: reason }) : null);
  replace(pointsBox, h("div", { class: "fd-list" }, info.points.map((p) => pointChoice(p, info))));
}
