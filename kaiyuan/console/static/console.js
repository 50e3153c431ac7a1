// Kaiyuan console: draws the charts (uPlot) and sends every action to the admin API.
// No inline scripts (the pages' CSP forbids them); every text is set with textContent.
"use strict";
(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";

  function show(message, ok, secret) {
    const out = document.getElementById("result");
    if (!out) { window.alert(message); return; }
    out.textContent = "";
    out.className = "result " + (ok ? "ok" : "err");
    const span = document.createElement("span");
    span.id = ok ? "result-ok" : "result-error";
    span.textContent = message;
    out.appendChild(span);
    if (secret) {
      const input = document.createElement("input");
      input.id = "new-secret"; input.readOnly = true; input.value = secret; input.size = 56;
      out.appendChild(input);
      const note = document.createElement("small");
      note.textContent = " Copy it now: it is shown only once. ";
      out.appendChild(note);
      const again = document.createElement("a");
      again.href = window.location.pathname; again.textContent = "Done";
      out.appendChild(again);
    }
  }

  async function call(spec, body) {
    const space = spec.indexOf(" ");
    const method = spec.slice(0, space), path = spec.slice(space + 1);
    const init = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data: data };
  }

  function formBody(form) {
    const body = {};
    let spec = form.dataset.api;
    for (const el of form.elements) {
      if (!el.name) continue;
      const type = el.dataset.type || "";
      if (el.dataset.path) { spec = spec.replace("{" + el.dataset.path + "}", encodeURIComponent(el.value)); continue; }
      if (type === "bool") { if (el.checked) body[el.name] = true; continue; }
      const v = el.value.trim();
      if (v === "") continue;
      if (type === "int") body[el.name] = parseInt(v, 10);
      else if (type === "float") body[el.name] = parseFloat(v);
      else if (type === "list") body[el.name] = v.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
      else if (type.indexOf("budget:") === 0) {
        body.budgets = (body.budgets || []).concat([{ period: type.slice(7), limit_usd: parseFloat(v) }]);
      } else body[el.name] = v;
    }
    return { spec: spec, body: body };
  }

  function message(res) {
    if (res.ok) return "Done.";
    const e = res.data && res.data.error;
    return "Refused (" + res.status + "): " + (e && e.message ? e.message : "no details");
  }

  async function act(spec, body, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    const res = await call(spec, body);
    const secret = res.ok && res.data && res.data.key ? res.data.key : null;
    show(message(res) + (res.ok && res.data && res.data.id ? " (" + res.data.id + ")" : ""), res.ok, secret);
    if (res.ok && !secret) window.setTimeout(function () { window.location.reload(); }, 700);
  }

  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    if (!form.dataset || !form.dataset.api) return;
    ev.preventDefault();
    const fb = formBody(form);
    act(fb.spec, fb.body, form.dataset.confirm);
  });
  document.addEventListener("click", function (ev) {
    const b = ev.target.closest ? ev.target.closest("button[data-api]") : null;
    if (!b) return;
    ev.preventDefault();
    let body;
    if (b.dataset.body) body = JSON.parse(b.dataset.body);
    act(b.dataset.api, body, b.dataset.confirm);
  });

  function json(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function plot(el, xs, lines, xTime) {
    if (typeof uPlot === "undefined" || !xs.length) return;
    const series = [{}].concat(lines.map(function (l) {
      return { label: l.label, stroke: l.color || "#2563eb", width: l.width || 2, dash: l.dash, fill: l.fill };
    }));
    const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 2 });
    const opts = { width: Math.max(el.clientWidth, 280), height: 180, series: series, scales: { x: { time: xTime } },
      legend: { show: true },
      axes: [{}, { size: 56, values: function (u, vals) { return vals.map(function (v) { return compact.format(v); }); } }] };
    new uPlot(opts, [xs].concat(lines.map(function (l) { return l.values; })), el);
  }

  function drawOverview() {
    const series = json("series-data");
    if (!series) return;
    const xs = series.map(function (p) { return p.t; });
    for (const el of document.querySelectorAll(".chart[data-series]")) {
      const f = el.dataset.series;
      plot(el, xs, [{ label: el.dataset.label, values: series.map(function (p) { return p[f]; }) }], true);
    }
  }

  function drawEstimates() {
    const est = json("estimate-data");
    if (!est) return;
    for (const el of document.querySelectorAll(".chart[data-candidate]")) {
      const path = est[el.dataset.candidate];
      if (!path || !path.points.length) continue;
      const pts = path.points;
      plot(el, pts.map(function (p) { return p.n; }), [
        { label: "estimate", values: pts.map(function (p) { return p.mean; }), color: "#2563eb" },
        { label: "lower", values: pts.map(function (p) { return p.lo; }), color: "#93c5fd", width: 1 },
        { label: "upper", values: pts.map(function (p) { return p.hi; }), color: "#93c5fd", width: 1 },
        { label: "threshold", values: pts.map(function () { return path.threshold; }), color: "#dc2626", width: 1, dash: [6, 4] },
      ], false);
    }
  }

  function ready() { drawOverview(); drawEstimates(); document.body.dataset.ready = "1"; }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready); else ready();
})();
