// `/models/{name}`: the rollout over time. The server keeps half an hour of samples; the page
// asks for those after the last one it has (`since`), appends them, and redraws the charts.
"use strict";

const MODEL = decodeURIComponent(location.pathname.split("/").pop());
const MAX_POINTS = 3600;  // the server's 900 samples, then the page's own polls: two hours at 2 s
const COLORS = ["#1f6feb", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#e67700", "#0b7285"];
const points = [];
const charts = new Map();  // id -> {plot, key}
let lastSeq = 0;

function versionsSeen() {
  const seen = new Set();
  for (const p of points) for (const v of Object.keys(p.versions)) seen.add(v);
  return [...seen].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
}

function checksSeen() {
  const seen = new Set();
  for (const p of points) for (const c of Object.keys(p.checks)) seen.add(c);
  return [...seen].sort();
}

function color(i) {
  return COLORS[i % COLORS.length];
}

function withAlpha(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

// One uPlot chart, made again only when its series change (a new version or check appears).
function draw(id, title, series, columns, extra) {
  const section = document.getElementById("charts");
  let box = document.getElementById(id);
  if (!box) {
    box = el("figure", { id, class: "chart" }, el("figcaption", { text: title }));
    section.append(box);
  }
  box.dataset.points = String(columns[0].length);
  const key = JSON.stringify(series.map((s) => s.label));
  const current = charts.get(id);
  if (current && current.key === key) {
    current.plot.setData(columns);
    return;
  }
  if (current) current.plot.destroy();
  const width = Math.max(300, box.clientWidth - 16);
  const options = {
    width,
    height: 200,
    series: [{}, ...series],
    axes: [{}, { size: 60, ...((extra && extra.yAxis) || {}) }, ...((extra && extra.axes) || [])],
    scales: { x: { time: true }, ...((extra && extra.scales) || {}) },
    bands: (extra && extra.bands) || [],
    legend: { live: true },
  };
  charts.set(id, { plot: new uPlot(options, columns, box), key });
}

function column(get) {
  return points.map((p) => {
    const value = get(p);
    return value === undefined ? null : value;
  });
}

function drawCharts() {
  const x = points.map((p) => p.t);
  draw(
    "chart-traffic",
    "Canary weight (%) and step",
    [
      { label: "canary weight %", stroke: color(0), width: 2, scale: "%" },
      { label: "step", stroke: color(1), width: 2, scale: "step", paths: uPlot.paths.stepped({ align: 1 }) },
    ],
    [x, column((p) => p.weight_pct), column((p) => p.step)],
    {
      scales: { "%": { range: [0, 100] }, step: { range: (u, lo, hi) => [0, Math.max(1, hi || 1)] } },
      yAxis: { scale: "%" },
      axes: [{ scale: "step", side: 1, size: 40, grid: { show: false } }],
    },
  );
  for (const name of checksSeen()) {
    const get = (key) => column((p) => (p.checks[name] ? p.checks[name][key] : null));
    draw(
      `chart-check-${name}`,
      `Check ${name}: estimate, interval, bound`,
      [
        { label: "estimate", stroke: color(0), width: 2 },
        { label: "high", stroke: withAlpha(color(0), 0.4) },
        { label: "low", stroke: withAlpha(color(0), 0.4) },
        { label: "bound", stroke: color(4), dash: [6, 4], width: 2 },
      ],
      [x, get("value"), get("high"), get("low"), get("bound")],
      { bands: [{ series: [2, 3], fill: withAlpha(color(0), 0.15) }] },
    );
  }
  const versions = versionsSeen();
  const perVersion = (key, label) => versions.map((v, i) => [{ label: `v${v} ${label}`, stroke: color(i), width: 2 }, column((p) => (p.versions[v] ? p.versions[v][key] : null))]);
  const latency = [...perVersion("p50_ms", "p50"), ...perVersion("p99_ms", "p99").map(([s, c]) => [{ ...s, dash: [5, 3] }, c])];
  draw("chart-latency", "Latency per version (ms): p50 solid, p99 dashed", latency.map((s) => s[0]), [x, ...latency.map((s) => s[1])]);
  const errors = perVersion("error_rate", "error rate");
  // A fraction: at least 0..1 %, so no errors reads as a flat line at 0, not a 0..100 axis.
  draw("chart-errors", "Error rate per version", errors.map((s) => s[0]), [x, ...errors.map((s) => s[1])], {
    scales: { y: { range: (u, lo, hi) => [0, Math.max(0.01, hi || 0)] } },
  });
  const accuracy = [];
  const bands = [];
  versions.forEach((v, i) => {
    const get = (key) => column((p) => (p.versions[v] ? p.versions[v][key] : null));
    const base = accuracy.length + 1;
    accuracy.push([{ label: `v${v} accuracy`, stroke: color(i), width: 2 }, get("accuracy")]);
    accuracy.push([{ label: `v${v} high`, stroke: withAlpha(color(i), 0.3) }, get("accuracy_high")]);
    accuracy.push([{ label: `v${v} low`, stroke: withAlpha(color(i), 0.3) }, get("accuracy_low")]);
    bands.push({ series: [base + 1, base + 2], fill: withAlpha(color(i), 0.12) });
  });
  draw("chart-accuracy", "Accuracy per version with its interval", accuracy.map((s) => s[0]), [x, ...accuracy.map((s) => s[1])], { bands });
  const agreement = perVersion("agreement", "agreement with stable");
  draw("chart-agreement", "Agreement with the stable version (shadows, compared canary rows)", agreement.map((s) => s[0]), [x, ...agreement.map((s) => s[1])]);
}

function describeChecks(checks) {
  if (!checks.length) return "–";
  return checks
    .map((c) => `${c.check} ${c.verdict}: ${fmt(c.value)} [${fmt(c.low)}, ${fmt(c.high)}] vs ${fmt(c.bound)}`)
    .join("; ");
}

function renderSummary(s) {
  const shadows = Object.entries(s.shadows).map(([v, p]) => `v${v} (${fmt(p, 3)} %)`).join(", ") || "none";
  const items = [
    ["stable", `v${s.stable}`],
    ["canary", s.canary ? `v${s.canary} at ${fmt(s.weight_pct, 3)} %` : "none"],
    ["shadows", shadows],
    ["rollout", (s.candidate && s.phase !== "idle" ? `${s.phase}, candidate v${s.candidate}` : s.phase) + (s.awaiting_approval ? `, ${awaiting(s.awaiting_approval)}` : "")],
    ["step", s.step === null ? "–" : String(s.step)],
    ["next", s.next ? `${s.next}: ${s.reason}` : "–"],
    ["labels joined", fmt(s.labels_joined)],
  ];
  const list = el("dl");
  for (const [term, value] of items) list.append(el("dt", { text: term }), el("dd", { text: value }));
  const alerts = el("div", { class: "alert-row" });
  for (const a of s.alerts) alerts.append(el("span", { class: `mark ${a.level}`, text: a.text }));
  document.getElementById("summary").replaceChildren(list, alerts);
}

function renderTables(body) {
  const s = body.snapshot;
  document.getElementById("checks").replaceChildren(
    ...(s.checks.length ? s.checks.map((c) => el("tr", { "data-check": c.check, class: c.verdict },
      el("td", { text: c.check }), el("td", { text: c.verdict }), el("td", { text: fmt(c.value) }),
      el("td", { text: `[${fmt(c.low)}, ${fmt(c.high)}]` }), el("td", { text: fmt(c.bound) }),
      el("td", { text: fmt(c.samples) }), el("td", { text: c.needed === null ? "–" : `~${fmt(c.needed)}` })))
      : [el("tr", {}, el("td", { colspan: "7", text: "no checks: no rollout is deciding" }))]),
  );
  document.getElementById("versions").replaceChildren(
    ...s.versions.map((v) => el("tr", { "data-version": v.version },
      el("td", { text: `v${v.version}` }), el("td", { text: v.role }), el("td", { text: fmt(v.requests) }),
      el("td", { text: `${fmt(v.errors)} (${pct(v.error_rate)})` }), el("td", { text: fmt(v.p50_ms, 3) }),
      el("td", { text: fmt(v.p99_ms, 3) }), el("td", { text: fmt(v.labelled) }),
      el("td", { text: v.accuracy === null ? "–" : `${pct(v.accuracy)} [${pct(v.accuracy_low)}, ${pct(v.accuracy_high)}]` }),
      el("td", { text: v.agreement === null ? "–" : `${pct(v.agreement)} of ${fmt(v.compared_rows)}` }))),
  );
  document.getElementById("audit").replaceChildren(
    ...body.audit.map((a) => el("tr", { "data-action": a.action, "data-outcome": a.outcome, class: a.outcome },
      el("td", { text: dateTime(a.at) }), el("td", { text: a.actor }), el("td", { text: a.action }),
      el("td", { text: a.outcome }), el("td", { text: a.reason }), el("td", { class: "evidence", text: describeChecks(a.checks) }))),
  );
}

function render(body) {
  for (const p of body.points) {
    points.push(p);
    lastSeq = p.seq;
  }
  points.splice(0, Math.max(0, points.length - MAX_POINTS));
  const s = body.snapshot;
  const main = document.getElementById("model");
  main.dataset.points = String(points.length);
  main.dataset.step = s.step === null ? "" : String(s.step);
  main.dataset.phase = s.phase;
  main.dataset.weight = String(s.weight_pct);
  renderSummary(s);
  renderTables(body);
  if (points.length) drawCharts();
}

document.getElementById("title").textContent = MODEL;
document.title = `${MODEL} · gateway dashboard`;
window.addEventListener("resize", () => {
  for (const [id, chart] of charts) chart.plot.setSize({ width: Math.max(300, document.getElementById(id).clientWidth - 16), height: 200 });
});
// Printing: charts sized for the paper's width, then back.
window.addEventListener("beforeprint", () => {
  for (const chart of charts.values()) chart.plot.setSize({ width: 640, height: 180 });
});
window.addEventListener("afterprint", () => window.dispatchEvent(new Event("resize")));
poll(() => `/api/models/${encodeURIComponent(MODEL)}?since=${lastSeq}`, render);
