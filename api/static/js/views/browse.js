// The file browser of a recovery point: folders, breadcrumbs, downloads, restore.

import { api, enc, q, scoped } from "../api.js";
import { h, icon, replace } from "../dom.js";
import { LOCATION_NAMES, MODE_NAMES, ago, bytes, count, dateTime, secondsSince } from "../format.js";
import { button, card, emptyState, loading, pageHeader, table } from "../ui.js";
import { copiesList, pointStatus, restoreDialog, verifyPoint } from "./points.js";

const PAGE = 500;

function downloadHref(pointId, path, format = "auto") {
  return scoped(q(`/api/points/${enc(pointId)}/download`, { path, format: format === "auto" ? "" : format }));
}

function browseHref(pointId, path) {
  return path ? `#/points/${enc(pointId)}?path=${enc(path)}` : `#/points/${enc(pointId)}`;
}

function breadcrumbs(point, path) {
  const parts = path ? path.split("/") : [];
  const items = [
    h("li", h("a", { href: "#/points", text: "Recovery points" })),
    h("li", h("a", { href: `#/points?asset=${enc(point.asset)}`, text: point.asset })),
    h("li", parts.length ? h("a", { href: browseHref(point.id, ""), text: dateTime(point.created_at) }) : h("span", { "aria-current": "page", text: dateTime(point.created_at) })),
  ];
  parts.forEach((name, i) => {
    const sub = parts.slice(0, i + 1).join("/");
    items.push(h("li", i === parts.length - 1 ? h("span", { "aria-current": "page", text: name }) : h("a", { href: browseHref(point.id, sub), text: name })));
  });
  return h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("ol", items));
}

function entryIcon(type) {
  if (type === "dir") return icon("folder", "ftype ftype-dir");
  if (type === "symlink") return icon("link", "ftype");
  return icon("file", "ftype");
}

export default async function browse(view) {
  const [pointId] = view.params;
  const path = (view.query.get("path") || "").replace(/^\/+|\/+$/g, "");
  const body = h("div", loading());
  replace(view.el, body);
  let point;
  let listing;
  try {
    [point, listing] = await Promise.all([api.get(`/api/points/${enc(pointId)}`), api.get(q(`/api/points/${enc(pointId)}/files`, { path, limit: PAGE }))]);
  } catch (err) {
    replace(view.el, pageHeader("Browse a recovery point"), h("p", h("a", { href: "#/points", text: "Back to recovery points" })));
    view.banner.error(err);
    return;
  }
  view.setTitle(`${point.asset} ${dateTime(point.created_at)}`);
  const canRun = view.can("operator");
  const folderName = path ? path.split("/").pop() : "the whole point";

  const headerActions = [
    canRun ? button("Restore…", { iconName: "restore", kind: "primary", onClick: () => restoreDialog(point, { path }) }) : null,
    canRun ? button("Verify", { iconName: "check", onClick: (e) => verifyPoint(point, e.currentTarget, view.banner) }) : null,
  ].filter(Boolean);
  const where = point.copies.length ? point.copies.map((c) => `${LOCATION_NAMES[c.location_kind] || c.location_kind} ${c.location}`).join("; ") : "no copy recorded";
  const meta = h(
    "div",
    { class: "meta" },
    h("span", h("strong", { text: MODE_NAMES[point.mode] || point.mode }), " backup"),
    h("span", { text: `${count(point.file_count, "file")}, ${bytes(point.logical_bytes)}` }),
    h("span", { text: `made ${ago(secondsSince(point.created_at))}` }),
    pointStatus(point),
    h("span", { class: "muted", title: where, text: `Stored in: ${where}` }),
  );

  const rows = [...listing.entries];
  const tableBox = h("div");
  const more = h("div", { class: "more" });

  const entryActions = (e) => {
    if (!canRun) return null;
    if (e.type === "dir") {
      return h(
        "div",
        { class: "row-actions" },
        h("a", { class: "btn btn-small", href: downloadHref(point.id, e.path, "tar"), download: "", "aria-label": `Download folder ${e.name} as tar` }, icon("download"), ".tar"),
        h("a", { class: "btn btn-small", href: downloadHref(point.id, e.path, "zip"), download: "", "aria-label": `Download folder ${e.name} as zip` }, icon("download"), ".zip"),
        h("button", { type: "button", class: "icon-btn", title: "Restore", "aria-label": `Restore ${e.name}`, onClick: () => restoreDialog(point, { path: e.path }) }, icon("restore")),
      );
    }
    if (e.type === "symlink") return null;
    return h(
      "div",
      { class: "row-actions" },
      h("a", { class: "btn btn-small", href: downloadHref(point.id, e.path), download: "", "aria-label": `Download ${e.name}` }, icon("download"), "Download"),
      h("button", { type: "button", class: "icon-btn", title: "Restore", "aria-label": `Restore ${e.name}`, onClick: () => restoreDialog(point, { path: e.path }) }, icon("restore")),
    );
  };
  const nameCell = (e) =>
    h(
      "div",
      { class: "fname" },
      entryIcon(e.type),
      e.type === "dir" ? h("a", { href: browseHref(point.id, e.path), text: e.name }) : h("span", { text: e.name }),
      e.type === "symlink" && e.target ? h("span", { class: "muted small", text: ` → ${e.target}` }) : null,
    );
  const draw = () => {
    replace(
      tableBox,
      rows.length
        ? table(
            [
              { label: "Name", cell: nameCell },
              { label: "Size", cell: (e) => (e.type === "dir" ? h("span", { class: "muted", text: "folder" }) : e.type === "symlink" ? h("span", { class: "muted", text: "link" }) : bytes(e.size)), className: "num" },
              { label: "Modified", cell: (e) => dateTime(e.mtime), className: "hide-md" },
              { label: "Actions", cell: entryActions, className: "actions" },
            ],
            rows,
            { caption: `Contents of ${path || "the point"}`, rowAttrs: (e) => ({ dataset: { entry: e.name, type: e.type } }) },
          )
        : emptyState("folder", "This folder is empty", "It held no files when the backup ran."),
    );
  };
  let nextAfter = listing.next_after;
  const drawMore = () => {
    replace(
      more,
      nextAfter
        ? button("Show more", {
            onClick: async (ev) => {
              ev.currentTarget.disabled = true;
              try {
                const page = await api.get(q(`/api/points/${enc(point.id)}/files`, { path, after: nextAfter, limit: PAGE }));
                rows.push(...page.entries);
                nextAfter = page.next_after;
                draw();
                drawMore();
              } catch (err) {
                view.banner.error(err);
              }
            },
          })
        : null,
    );
  };
  draw();
  drawMore();

  const folderTools = canRun
    ? h(
        "div",
        { class: "card-actions" },
        h("a", { class: "btn btn-small", href: downloadHref(point.id, path, "tar"), download: "" }, icon("download"), "Download as .tar"),
        h("a", { class: "btn btn-small", href: downloadHref(point.id, path, "zip"), download: "" }, icon("download"), "Download as .zip"),
      )
    : null;
  replace(
    view.el,
    pageHeader(`Browse: ${point.asset}`, `Recovery point made ${dateTime(point.created_at)}`, ...headerActions),
    meta,
    breadcrumbs(point, path),
    card(
      path ? `Folder ${folderName}` : "Top folder",
      { actions: folderTools ? [folderTools] : [], subtitle: `${count(rows.length, "item")}${nextAfter ? " shown" : ""}` },
      tableBox,
      more,
    ),
    card("Copies", { subtitle: "Where this point is kept; a locked copy cannot be deleted before its protection ends." }, copiesList(point.copies)),
  );
}
