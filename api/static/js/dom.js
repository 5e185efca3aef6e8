// Building DOM nodes without innerHTML: every piece of data becomes a text node or an
// attribute value, so names and paths from the appliance can never inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") {
      el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (key === "text") {
      el.textContent = String(value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "style" && typeof value === "object") {
      Object.assign(el.style, value);
    } else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "value" && "value" in el) {
      el.value = value;
    } else if (key === "checked" || key === "selected" || key === "disabled") {
      el[key] = Boolean(value);
      if (value) el.setAttribute(key, "");
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** h("button", {class: "btn", onClick: fn}, "Label") */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

// --- icons: drawn for this page on a 24 x 24 grid, stroked with currentColor -------------------------

const ICONS = {
  dashboard: ["M4 4h7v9H4z", "M13 4h7v5h-7z", "M13 11h7v9h-7z", "M4 15h7v5H4z"],
  assets: ["M3 7a2 2 0 0 1 2-2h4l2 2h8a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z", "M3 10h18"],
  points: ["M12 7v5l3 2", "M4.5 12a7.5 7.5 0 1 0 2.2-5.3", "M4 4v3.5h3.5"],
  jobs: ["M9 6h11", "M9 12h11", "M9 18h11", "M4 5.5l1 1 2-2", "M4 11.5l1 1 2-2", "M4 17.5l1 1 2-2"],
  pools: [
    "M5 6c0-1.7 3.1-3 7-3s7 1.3 7 3v12c0 1.7-3.1 3-7 3s-7-1.3-7-3z",
    "M5 6c0 1.7 3.1 3 7 3s7-1.3 7-3",
    "M5 12c0 1.7 3.1 3 7 3s7-1.3 7-3",
  ],
  users: [
    "M9 11a3.5 3.5 0 1 0 0-7 3.5 3.5 0 0 0 0 7z",
    "M2.5 20c.6-3.4 3.2-5.5 6.5-5.5s5.9 2.1 6.5 5.5",
    "M16 4.3a3.5 3.5 0 0 1 0 6.4",
    "M18 14.8c1.9.8 3.1 2.6 3.5 5.2",
  ],
  audit: ["M6 3h9l4 4v14H6z", "M14 3v5h5", "M9 12h7", "M9 16h7"],
  logout: ["M10 4H5v16h5", "M14 8l4 4-4 4", "M8 12h10"],
  plus: ["M12 5v14", "M5 12h14"],
  play: ["M8 5.5v13l10-6.5z"],
  folder: ["M3 7a2 2 0 0 1 2-2h4l2 2h8a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z"],
  file: ["M6 3h8l4 4v14H6z", "M14 3v4h4"],
  link: ["M10 14a4 4 0 0 0 5.7 0l3-3a4 4 0 0 0-5.7-5.7l-1 1", "M14 10a4 4 0 0 0-5.7 0l-3 3a4 4 0 0 0 5.7 5.7l1-1"],
  disk: ["M4 6h16v12H4z", "M7 14h4", "M16 14h1"],
  download: ["M12 4v11", "M7 10l5 5 5-5", "M5 20h14"],
  restore: ["M4 12a8 8 0 1 0 2.4-5.7", "M4 4v4h4", "M12 8v4l3 2"],
  shield: ["M12 3l7 3v6c0 4.5-3 7.5-7 9-4-1.5-7-4.5-7-9V6z", "M9 12l2 2 4-4"],
  check: ["M5 12.5l4.5 4.5L19 7"],
  alert: ["M12 4l9 16H3z", "M12 10v4", "M12 17h.01"],
  close: ["M6 6l12 12", "M18 6L6 18"],
  menu: ["M4 7h16", "M4 12h16", "M4 17h16"],
  key: ["M8 15a4 4 0 1 0 0-8 4 4 0 0 0 0 8z", "M12 11h9", "M18 11v3", "M21 11v2"],
  edit: ["M4 20h4L19 9l-4-4L4 16z", "M13 7l4 4"],
  trash: ["M5 7h14", "M9 7V4h6v3", "M7 7l1 13h8l1-13"],
  chevron: ["M9 6l6 6-6 6"],
  refresh: ["M20 12a8 8 0 1 1-2.3-5.7", "M20 4v4h-4"],
  copy: ["M8 8h11v12H8z", "M5 16V4h11"],
  settings: [
    "M12 15a3 3 0 1 0 0-6 3 3 0 0 0 0 6z",
    "M12 2.5v3", "M12 18.5v3", "M2.5 12h3", "M18.5 12h3",
    "M5.3 5.3l2.1 2.1", "M16.6 16.6l2.1 2.1", "M5.3 18.7l2.1-2.1", "M16.6 7.4l2.1-2.1",
  ],
};

export function icon(name, extraClass = "") {
  const paths = ICONS[name] || ICONS.file;
  return s(
    "svg",
    {
      class: `icon ${extraClass}`.trim(),
      viewBox: "0 0 24 24",
      width: 18,
      height: 18,
      fill: "none",
      stroke: "currentColor",
      "stroke-width": 1.8,
      "stroke-linecap": "round",
      "stroke-linejoin": "round",
      "aria-hidden": "true",
      focusable: "false",
    },
    paths.map((d) => s("path", { d })),
  );
}
