// moe-dash: draws the runs' snapshot (see moe/dash/data.py) as SVG. No libraries, no network
// beyond this dashboard's own /api: it must work on a machine with no internet.
"use strict";
(function () {
  const CFG = window.MOE_DASH || {};
  const SVGNS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const hidden = new Set(); // runs the user clicked away; kept across refreshes
  let lastSnap = null;
  let version = null;

  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  };
  const svgEl = (tag, attrs) => {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  };
  const fmt = (v, digits) => (v == null || !isFinite(v) ? "–" : Number(v).toFixed(digits));
  const fmtCount = (v) => {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100) return String(Math.round(v)); // 915, not 915.36, beside 3.1k
    return String(Number(v.toPrecision(3)));
  };
  const colorOf = (snap, name) => PALETTE[snap.runs.findIndex((r) => r.name === name) % PALETTE.length];

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo, step0 = span / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
    return out;
  }

  // A line chart: series = [{name, color, points: [[x, y], ...]}]. The <svg> carries
  // data-points (how many points were drawn) so a test can check that it holds data.
  function lineChart(title, series, opts) {
    opts = opts || {};
    const flagClass = opts.flagClass || "collapsed";
    const box = el("div", { class: "chart" + (opts.flag ? " " + flagClass : ""), "data-chart": opts.id || title });
    box.append(el("h3", { text: title }, opts.flag ? el("span", { class: "badge " + flagClass, text: opts.flag }) : null));
    const pts = series.flatMap((s) => s.points);
    if (!pts.length) {
      box.append(el("div", { class: "empty", text: "no data yet" }));
      return box;
    }
    const W = opts.width || 520, H = opts.height || 240, m = { l: 52, r: 12, t: 8, b: 32 };
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    let y0 = opts.ymin != null ? opts.ymin : Math.min(...ys), y1 = Math.max(...ys);
    if (opts.robust && ys.length > 8) { // leave the first steep drop of a loss curve out of the range
      const sorted = ys.slice().sort((a, b) => a - b);
      y1 = Math.min(y1, sorted[Math.floor(sorted.length * 0.95)] * 1.02 + 1e-12);
    }
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 = y0 + Math.abs(y0) * 0.05 + 1e-6; y0 = y0 - (opts.ymin != null ? 0 : Math.abs(y0) * 0.05); }
    const pad = (y1 - y0) * 0.04; y1 += pad; if (opts.ymin == null) y0 -= pad;
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const Y = (y) => H - m.b - ((Math.min(Math.max(y, y0), y1) - y0) / (y1 - y0)) * (H - m.t - m.b);
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "line-chart", "data-points": String(pts.length), "data-series": String(series.length) });
    const ax = svgEl("g", { class: "axis" });
    for (const t of niceTicks(y0, y1, 5)) {
      ax.append(svgEl("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "gridline" }));
      const tx = svgEl("text", { x: m.l - 6, y: Y(t) + 3, "text-anchor": "end" });
      tx.textContent = opts.yfmt ? opts.yfmt(t) : fmtCount(t);
      ax.append(tx);
    }
    for (const t of niceTicks(x0, x1, 6)) {
      const tx = svgEl("text", { x: X(t), y: H - m.b + 14, "text-anchor": "middle" });
      tx.textContent = fmtCount(t);
      ax.append(tx);
    }
    ax.append(svgEl("path", { d: `M${m.l},${m.t}V${H - m.b}H${W - m.r}`, fill: "none" }));
    const xl = svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" });
    xl.textContent = opts.xlabel || "step";
    ax.append(xl);
    svg.append(ax);
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6, "stroke-dasharray": s.dash || "", class: "series", "data-run": s.name }));
      if (s.points.length === 1) svg.append(svgEl("circle", { cx: X(s.points[0][0]), cy: Y(s.points[0][1]), r: 3, fill: s.color }));
    }
    const cursor = svgEl("line", { y1: m.t, y2: H - m.b, stroke: "#99a", "stroke-dasharray": "3,3", visibility: "hidden" });
    svg.append(cursor);
    box.append(svg);
    const tip = el("div", { class: "tip" });
    box.append(tip);
    svg.addEventListener("mousemove", (ev) => {
      const r = svg.getBoundingClientRect();
      const sx = ((ev.clientX - r.left) / r.width) * W;
      const x = x0 + ((sx - m.l) / (W - m.l - m.r)) * (x1 - x0);
      const lines = [];
      for (const s of series) {
        if (!s.points.length) continue;
        let best = s.points[0];
        for (const p of s.points) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
        lines.push(`${s.name}: ${opts.yfmt ? opts.yfmt(best[1]) : fmt(best[1], 4)} @ ${best[0]}`);
      }
      cursor.setAttribute("x1", sx); cursor.setAttribute("x2", sx); cursor.setAttribute("visibility", "visible");
      tip.textContent = lines.join("\n");
      tip.style.display = "block";
      tip.style.left = Math.min(ev.clientX - r.left + 14, r.width - 200) + "px";
      tip.style.top = ev.clientY - r.top + 10 + "px";
    });
    svg.addEventListener("mouseleave", () => { tip.style.display = "none"; cursor.setAttribute("visibility", "hidden"); });
    if (series.length > 1 || opts.legend) {
      const lg = el("div", { class: "legend" });
      for (const s of series) lg.append(el("span", {}, el("span", { class: "swatch", style: `background:${s.color}` }), s.name));
      box.append(lg);
    }
    return box;
  }

  function viridis(t) {
    t = Math.min(1, Math.max(0, t));
    const f = t * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(f)), u = f - i;
    const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * u));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  // Blue (negative) through white to red (positive), for signed values such as the expert bias.
  function diverging(t) {
    t = Math.min(1, Math.max(-1, t));
    const w = 1 - Math.abs(t), c = t < 0 ? [33, 102, 172] : [178, 24, 43];
    return `rgb(${c.map((a) => Math.round(a + (255 - a) * w)).join(",")})`;
  }

  // Experts x steps heatmap. Columns are thinned to at most 240. By default the values are
  // token shares (layer.frac, viridis from 0, the even share 1/E marked); opts.values, opts.scale
  // (value -> colour, with .ticks for the colour bar) and opts.tip give another quantity.
  function heatmap(title, layer, opts) {
    const box = el("div", { class: "chart" + (opts.flag ? " collapsed" : ""), "data-chart": opts.id });
    box.append(el("h3", { text: title }, opts.flag ? el("span", { class: "badge", text: opts.flag }) : null));
    const values = opts.values || layer.frac;
    const T = layer.steps.length;
    if (!T || !values[T - 1]) { box.append(el("div", { class: "empty", text: "no data yet" })); return box; }
    const E = values[T - 1].length;
    const stride = Math.ceil(T / 240), cols = [];
    for (let t = 0; t < T; t += stride) if (values[t]) cols.push(t);
    if (cols[cols.length - 1] !== T - 1) cols.push(T - 1);
    const W = 640, m = { l: 44, r: 70, t: 6, b: 30 }, cellH = Math.max(6, Math.min(22, 260 / E)), H = m.t + m.b + cellH * E;
    const cw = (W - m.l - m.r) / cols.length;
    let scale = opts.scale, tip = opts.tip;
    if (!scale) {
      let vmax = 2 / E;
      for (const t of cols) for (const v of values[t]) vmax = Math.max(vmax, v);
      scale = (v) => viridis(v / vmax);
      scale.lo = 0; scale.hi = vmax;
      scale.ticks = [[0, "0%"], [1 / E, "1/E"], [vmax, (100 * vmax).toFixed(0) + "%"]];
      scale.bar = (u) => viridis(u);
      tip = (e, step, v) => `expert ${e}, step ${step}: ${(100 * v).toFixed(1)}% of tokens`;
    }
    const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "heatmap", "data-experts": String(E), "data-columns": String(cols.length), "data-cells": String(E * cols.length) });
    const g = svgEl("g", {});
    cols.forEach((t, ci) => {
      values[t].forEach((v, e) => {
        const r = svgEl("rect", { x: (m.l + ci * cw).toFixed(2), y: (m.t + e * cellH).toFixed(2), width: (cw + 0.3).toFixed(2), height: cellH + 0.3, fill: scale(v), class: "cell" });
        const tt = svgEl("title", {});
        tt.textContent = tip(e, layer.steps[t], v);
        r.append(tt);
        g.append(r);
      });
    });
    svg.append(g);
    const ax = svgEl("g", { class: "axis" });
    const every = Math.ceil(E / 16);
    for (let e = 0; e < E; e += every) {
      const tx = svgEl("text", { x: m.l - 5, y: m.t + e * cellH + cellH / 2 + 3, "text-anchor": "end" });
      tx.textContent = "e" + e;
      ax.append(tx);
    }
    const s0 = layer.steps[0], s1 = layer.steps[T - 1];
    const used = new Set();
    for (const s of niceTicks(s0, s1, 6)) {
      const ci = cols.findIndex((t) => layer.steps[t] >= s);
      if (ci < 0 || used.has(ci)) continue;
      used.add(ci);
      const tx = svgEl("text", { x: m.l + (ci + 0.5) * cw, y: H - m.b + 13, "text-anchor": "middle" });
      tx.textContent = fmtCount(layer.steps[cols[ci]]); // the column's own step, not the tick asked for
      ax.append(tx);
    }
    const xl = svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 3, "text-anchor": "middle" });
    xl.textContent = "step";
    ax.append(xl);
    // colour bar from scale.lo to scale.hi, with its ticks
    const bx = W - m.r + 18, bh = H - m.t - m.b, span = scale.hi - scale.lo || 1;
    for (let i = 0; i < 40; i++) ax.append(svgEl("rect", { x: bx, y: m.t + bh - ((i + 1) / 40) * bh, width: 10, height: bh / 40 + 0.5, fill: scale.bar((i + 0.5) / 40) }));
    for (const [v, label] of scale.ticks) {
      const y = m.t + bh - ((v - scale.lo) / span) * bh;
      ax.append(svgEl("line", { x1: bx - 2, x2: bx + 12, y1: y, y2: y, stroke: "#333" }));
      const tx = svgEl("text", { x: bx + 15, y: y + 3 });
      tx.textContent = label;
      ax.append(tx);
    }
    svg.append(ax);
    box.append(svg);
    return box;
  }

  // The loss-free balancing bias of each expert over time: red raised (underloaded), blue lowered.
  function biasHeatmap(title, layer, id) {
    let amax = 1e-9;
    for (const row of layer.bias) if (row) for (const v of row) amax = Math.max(amax, Math.abs(v));
    const scale = (v) => diverging(v / amax);
    scale.lo = -amax; scale.hi = amax;
    scale.ticks = [[-amax, (-amax).toPrecision(2)], [0, "0"], [amax, "+" + amax.toPrecision(2)]];
    scale.bar = (u) => diverging(2 * u - 1);
    const tip = (e, step, v) => `expert ${e}, step ${step}: bias ${v >= 0 ? "+" : ""}${v.toPrecision(3)}`;
    return heatmap(title, layer, { id, values: layer.bias, scale, tip });
  }

  function renderAlerts(snap) {
    const host = document.getElementById("alerts");
    host.replaceChildren();
    if (snap.alerts.length) {
      const ul = el("ul");
      for (const a of snap.alerts) ul.append(el("li", { text: `${a.run}, block ${a.layer}: ${a.reason} (at step ${a.step}, since step ${a.since})` }));
      host.append(el("div", { class: "alert bad", id: "collapse-alert", role: "alert" }, `Routing collapse in ${snap.alerts.length} layer${snap.alerts.length > 1 ? "s" : ""}`, ul));
    } else if (snap.runs.length) {
      const anyMoe = snap.runs.some((r) => Object.keys(r.layers).length);
      host.append(el("div", { class: "alert ok", id: "collapse-ok", text: anyMoe
        ? `No collapse: in every layer's latest window no expert takes over half the tokens and the load CV is at most ${snap.cv_threshold}.`
        : "No MoE layers in these runs." }));
    } else {
      host.append(el("div", { class: "alert ok", text: "No runs yet under this folder: start one with moe-train; this page fills in as it logs." }));
    }
  }

  function renderTable(snap) {
    const tbl = document.getElementById("runs-table");
    tbl.replaceChildren();
    const head = ["run", "status", "step", "train loss", "val loss", "tokens/s", "MFU", "params (total / active)", ...snap.diff_keys];
    tbl.append(el("thead", {}, el("tr", {}, ...head.map((h, i) => el("th", { class: i === 0 ? "name" : "", text: h })))));
    const body = el("tbody");
    const collapsedRuns = new Set(snap.alerts.map((a) => a.run));
    for (const r of snap.runs) {
      const last = (k) => { const s = r.series[k]; return s && s.length ? s[s.length - 1][1] : null; };
      const tr = el("tr", { class: "run-row" + (hidden.has(r.name) ? " hidden" : "") + (collapsedRuns.has(r.name) ? " collapsed" : ""), "data-run": r.name, title: r.path });
      const cells = [
        el("td", { class: "name" }, el("span", { class: "swatch", style: `background:${colorOf(snap, r.name)}` }), r.name),
        el("td", { class: "status-" + r.status, text: r.status }),
        el("td", { text: String(r.last_step) }),
        el("td", { text: fmt(last("train/loss"), 4) }),
        el("td", { text: fmt(last("val/loss"), 4) }),
        el("td", { text: fmtCount(last("perf/tokens_per_s")) }),
        el("td", { text: last("perf/mfu") == null ? "–" : (100 * last("perf/mfu")).toFixed(1) + "%" }),
        el("td", { text: r.params.total ? `${fmtCount(r.params.total)} / ${fmtCount(r.params.active_non_embedding)}` : "–" }),
        ...snap.diff_keys.map((k) => el("td", { text: r.diff[k] == null ? "–" : typeof r.diff[k] === "object" ? JSON.stringify(r.diff[k]) : String(r.diff[k]) })),
      ];
      tr.append(...cells);
      tr.addEventListener("click", () => { hidden.has(r.name) ? hidden.delete(r.name) : hidden.add(r.name); render(lastSnap); });
      body.append(tr);
    }
    tbl.append(body);
  }

  function renderOverlay(snap) {
    const host = document.getElementById("overlay-charts");
    host.replaceChildren();
    const shown = snap.runs.filter((r) => !hidden.has(r.name));
    const ser = (key, scale) => shown.map((r) => ({ name: r.name, color: colorOf(snap, r.name), points: (r.series[key] || []).map((p) => [p[0], p[1] * (scale || 1)]) }));
    host.append(lineChart("Train loss", ser("train/loss"), { id: "train-loss", robust: true, yfmt: (v) => v.toFixed(2), legend: true }));
    host.append(lineChart("Val loss", ser("val/loss"), { id: "val-loss", robust: true, yfmt: (v) => v.toFixed(2), legend: true }));
    host.append(lineChart("Tokens / s", ser("perf/tokens_per_s"), { id: "tokens-per-s", ymin: 0, legend: true }));
    // MFU above 100% is impossible: the run's start-up peak was measured while something else
    // loaded the machine. Say so on the chart rather than let the number pass.
    const over = shown.filter((r) => (r.series["perf/mfu"] || []).some((p) => p[1] > 1.0)).map((r) => r.name);
    const mfu = lineChart("MFU (% of the measured matmul peak)", ser("perf/mfu", 100), { id: "mfu", ymin: 0, yfmt: (v) => v.toFixed(0) + "%", legend: true, flag: over.length ? "peak measured under load" : null, flagClass: "warned" });
    if (over.length) mfu.insertBefore(el("div", { class: "hint warn", id: "mfu-warning", text: `Above 100% in ${over.join(", ")}: the matmul peak each run measured at start-up was taken while the machine was busy, so its MFU is overstated. Pass peak_flops= (moe-bench quality does) to compare runs.` }), mfu.children[1]);
    host.append(mfu);
  }

  function renderLoad(snap) {
    const host = document.getElementById("load-panels");
    host.replaceChildren();
    const flagged = new Map(snap.alerts.map((a) => [`${a.run}/${a.layer}`, a]));
    for (const r of snap.runs) {
      const layerIds = Object.keys(r.layers);
      if (!layerIds.length || hidden.has(r.name)) continue;
      const block = el("div", { class: "run-block", "data-run": r.name });
      block.append(el("h3", { class: "run-title" }, el("span", { class: "swatch", style: `background:${colorOf(snap, r.name)}` }), r.name));
      for (const i of layerIds) {
        const L = r.layers[i];
        const a = flagged.get(`${r.name}/${i}`);
        const flag = a ? "collapse" : null;
        const row = el("div", { class: "layer-row" });
        row.append(heatmap(`block ${i}: expert load over time (${L.frac.length ? L.frac[L.frac.length - 1].length : 0} experts)`, L, { id: `heatmap-${r.name}-${i}`, flag }));
        const pts = (arr, scale) => L.steps.map((s, t) => [s, arr[t]]).filter((p) => p[1] != null).map((p) => [p[0], p[1] * scale]);
        row.append(lineChart(`block ${i}: dropped tokens and load CV`, [
          { name: "dropped %", color: "#d62728", points: pts(L.dropped_frac, 100) },
          { name: "load CV x100", color: "#1f77b4", dash: "4,3", points: pts(L.cv, 100) },
          { name: "top expert share %", color: "#ff7f0e", dash: "1,3", points: pts(L.max_frac, 100) },
        ], { id: `dropped-${r.name}-${i}`, ymin: 0, width: 420, height: 200, yfmt: (v) => v.toFixed(0), flag, legend: true }));
        if (L.bias && L.bias.some((b) => b)) {
          row.append(biasHeatmap(`block ${i}: expert bias (loss-free balancing: raised while underloaded)`, L, `bias-${r.name}-${i}`));
        }
        block.append(row);
      }
      host.append(block);
    }
  }

  function render(snap) {
    lastSnap = snap;
    document.getElementById("root").textContent = snap.root;
    const when = new Date((snap.generated || Date.now() / 1000) * 1000).toLocaleTimeString();
    document.getElementById("status").textContent = `${snap.runs.length} run${snap.runs.length === 1 ? "" : "s"} · updated ${when}` + (CFG.refresh_s ? ` · checks every ${CFG.refresh_s}s` : " · static export");
    renderAlerts(snap);
    renderTable(snap);
    renderOverlay(snap);
    renderLoad(snap);
    document.body.dataset.ready = "1";
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }

  async function refresh() {
    try {
      const v = await (await fetch("/api/version", { cache: "no-store" })).json();
      if (v.version === version) return;
      const snap = await (await fetch("/api/snapshot", { cache: "no-store" })).json();
      version = snap.version;
      render(snap);
    } catch (e) {
      document.getElementById("status").textContent = "cannot reach moe-dash (stopped?): " + e;
    }
  }

  if (CFG.data) {
    render(CFG.data);
  } else {
    refresh();
    if (CFG.refresh_s > 0) setInterval(refresh, CFG.refresh_s * 1000);
  }
})();
