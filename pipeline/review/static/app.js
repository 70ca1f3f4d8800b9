// smear review: keyboard-first checking of every call. No framework, no network beyond this server.
"use strict";
const token = new URLSearchParams(location.search).get("token");
const withToken = (url) => token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
async function api(url, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  if (token) opts.headers = Object.assign(opts.headers || {}, {"X-Smear-Token": token});
  const r = await fetch(url, opts);
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || r.statusText);
  return r.json();
}
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) k === "class" ? e.className = v : e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
};
let LABELS = [], KEYS = {}, slide = null, cells = [], order = [], sel = 0;

// WBC classes first, then platelets, then RBCs; within a class the doubtful calls first.
function classRank(label) { const i = LABELS.indexOf(label); return label === "RBC" ? 99 : label === "Platelets" ? 98 : i < 0 ? 50 : i; }
function doubt(c) { return (c.review ? 0 : 1) * 10 + (c.score_in_group ?? 1); }

async function showSlides() {
  slide = null; location.hash = "";
  $("slide-view").hidden = true; $("slides-view").hidden = false; $("where").textContent = "";
  const body = $("slides").querySelector("tbody"); body.replaceChildren();
  for (const s of await api("/api/slides")) {
    const tr = el("tr", {class: "slide", "data-slide": s.slide},
      el("td", {}, s.slide), el("td", {class: "status-" + s.status.replace(" ", "-")}, s.status),
      el("td", {}, String(s.fields)), el("td", {}, String(s.cells)), el("td", {}, String(s.corrected)), el("td", {}, s.reviewer || ""));
    tr.onclick = () => openSlide(s.slide);
    body.append(tr);
  }
}

async function openSlide(name) {
  slide = name; location.hash = "slide=" + encodeURIComponent(name);
  $("slides-view").hidden = true; $("slide-view").hidden = false; $("where").textContent = "slide " + name;
  cells = await api(`/api/slides/${encodeURIComponent(name)}/cells`);
  const groups = {};
  for (const c of cells) (groups[c.final_label] = groups[c.final_label] || []).push(c);
  const gallery = $("gallery"); gallery.replaceChildren(); order = [];
  for (const label of Object.keys(groups).sort((a, b) => classRank(a) - classRank(b))) {
    const list = groups[label].sort((a, b) => doubt(a) - doubt(b));
    const tiles = el("div", {class: "tiles"});
    gallery.append(el("h3", {"data-group": label}, `${label} (${list.length})`), tiles);
    for (const c of list) {
      c.index = order.length; order.push(c);
      const t = el("div", {class: "tile", id: "cell-" + c.id, "data-id": c.id},
        el("img", {src: withToken(`/api/cells/${c.id}/crop.png`), loading: "lazy", alt: c.label}), el("div", {class: "lab"}));
      t.onclick = () => select(c.index);
      tiles.append(t); paint(c);
    }
  }
  sel = 0; select(0); gallery.focus();
  await refresh();
}

function paint(c) {
  const t = $("cell-" + c.id); if (!t) return;
  t.querySelector(".lab").textContent = c.final_label + (c.corrected_label && c.corrected_label !== c.label ? ` (was ${c.label})` : "");
  t.classList.toggle("flagged", c.review || (c.score_in_group ?? 1) < 0.5);
  t.classList.toggle("corrected", !!c.corrected_label && c.corrected_label !== c.label);
  t.classList.toggle("accepted", c.accepted);
  t.dataset.label = c.final_label;
}

function select(i) {
  if (!order.length) return;
  sel = Math.max(0, Math.min(order.length - 1, i));
  document.querySelectorAll(".tile.sel").forEach((t) => t.classList.remove("sel"));
  const c = order[sel], t = $("cell-" + c.id);
  t.classList.add("sel"); t.scrollIntoView({block: "nearest"});
  $("current").textContent = `cell ${c.id} in ${c.image}: ${c.final_label}, group ${c.group}, score ${c.score}` +
    (c.below_threshold ? (c.group === "WBC"
      ? " (the detector scored it under its threshold; the classifier is sure it is a WBC)"
      : " (the detector scored it under its threshold; kept where no other box covered the red cell)")
      : c.review ? " (the two stages disagree)" : "");
  if (!$("field-view").hidden) showField();
}

async function showField() {
  const c = order[sel], f = await api(`/api/fields/${c.field}`);
  const img = $("field-img"); img.src = withToken(`/api/fields/${c.field}/overlay.png`);
  const b = $("field-box").style, [x1, y1, x2, y2] = c.box;
  b.left = 100 * x1 / f.width + "%"; b.top = 100 * y1 / f.height + "%";
  b.width = 100 * (x2 - x1) / f.width + "%"; b.height = 100 * (y2 - y1) / f.height + "%";
}

async function setLabel(label) {  // label null: accept the call as it stands
  const c = order[sel];
  try {
    Object.assign(c, await api(`/api/cells/${c.id}`, {label}));
  } catch (e) { $("current").textContent = "not saved: " + e.message; return; }
  paint(c); select(sel + 1); await refresh();
}

function rowsOf(obj) { return Object.entries(obj).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v)))); }

async function refresh() {
  const s = await api(`/api/slides/${encodeURIComponent(slide)}/summary`);
  $("counts").replaceChildren(...rowsOf(s.counts));
  const d = s.differential, rows = [el("tr", {}, el("td", {}, "WBCs classified"), el("td", {id: "n-wbc"}, String(d.n_wbc)))];
  for (const [k, v] of Object.entries(d)) if (v && v.percent !== undefined)
    rows.push(el("tr", {"data-class": k}, el("td", {}, k), el("td", {class: "pct"}, v.percent === null ? "-" : `${v.percent}% (${v.count}; 95% CI ${v.ci95[0]}-${v.ci95[1]}%)`)));
  if (d.nrbc_per_100_wbc && d.nrbc_per_100_wbc.count) rows.push(el("tr", {}, el("td", {}, "NRBC per 100 WBCs"), el("td", {}, String(d.nrbc_per_100_wbc.per_100_wbc))));
  $("differential").replaceChildren(...rows);
  $("flags").replaceChildren(...(s.flags.length ? s.flags.map((f) => el("li", {class: "sev-" + f.severity.replace(" ", "-")},
    `${f.name} (${f.severity}): ${f.observed && typeof f.observed === "object" ? "see counts" : f.observed}; threshold ${f.threshold}`)) : [el("li", {}, "none")]));
  $("signed").textContent = s.status === "signed off" ? `Signed off by ${s.reviewer} at ${s.signed_at}` : `Status: ${s.status}`;
}

document.addEventListener("keydown", (e) => {
  if (!slide || e.target.tagName === "INPUT") return;
  const perRow = Math.max(1, Math.floor($("gallery").clientWidth / 118));
  if (e.key === "ArrowRight") select(sel + 1);
  else if (e.key === "ArrowLeft") select(sel - 1);
  else if (e.key === "ArrowDown") select(sel + perRow);
  else if (e.key === "ArrowUp") select(sel - perRow);
  else if (e.key === "Enter") setLabel(null);
  else if (e.key in KEYS) setLabel(KEYS[e.key]);
  else if (e.key === "f") { $("field-view").hidden = !$("field-view").hidden; if (!$("field-view").hidden) showField(); }
  else if (e.key === "Escape") showSlides();
  else return;
  e.preventDefault();
});

$("signoff").onsubmit = async (e) => {
  e.preventDefault();
  try {
    const r = await api(`/api/slides/${encodeURIComponent(slide)}/signoff`, {reviewer: $("reviewer").value});
    $("signed").textContent = `Signed off by ${r.reviewer} at ${r.signed_at}; written ${r.written}`;
  } catch (err) { $("signed").textContent = "not signed off: " + err.message; }
};
$("home").onclick = (e) => { e.preventDefault(); showSlides(); };

(async () => {
  const l = await api("/api/labels"); LABELS = l.labels; KEYS = l.keys;
  $("keys").replaceChildren(...Object.entries(KEYS).map(([k, v]) => el("span", {}, el("kbd", {}, k), " " + v)),
    el("span", {}, el("kbd", {}, "Enter"), " accept"), el("span", {}, el("kbd", {}, "\u2190\u2191\u2192\u2193"), " move"),
    el("span", {}, el("kbd", {}, "f"), " field"), el("span", {}, el("kbd", {}, "Esc"), " slides"));
  const m = location.hash.match(/^#slide=(.+)$/);
  if (m) await openSlide(decodeURIComponent(m[1])); else await showSlides();
})();
window.addEventListener("unhandledrejection", (e) => { $("current").textContent = "error: " + (e.reason && e.reason.message || e.reason); console.error(e.reason); });
