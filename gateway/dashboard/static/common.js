// Shared by the pages: polling the JSON, building table rows safely (text only, never HTML).
"use strict";

const POLL_MS = 1500;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(x, digits) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x) && digits === undefined) return x.toLocaleString("en");
  return x.toPrecision(digits || 4).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
}

// An approval gate (policy.approve_before) as `gateway status` words it; "" when none.
function awaiting(gate) {
  if (!gate) return "";
  const where = gate === "start" ? "the first traffic step" : gate === "promote" ? "promoting" : `${gate} %`;
  return `awaiting approval before ${where}`;
}

function pct(x) {
  return x === null || x === undefined ? "–" : `${fmt(x * 100, 4)} %`;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString("en-GB");
}

function dateTime(t) {
  const d = new Date(t * 1000);
  return `${d.toISOString().slice(0, 10)} ${d.toLocaleTimeString("en-GB")}`;
}

// Calls `render(json)` now and every POLL_MS; a 401 sends the page to the login form.
function poll(url, render) {
  const status = document.getElementById("status");
  async function once() {
    try {
      const response = await fetch(typeof url === "function" ? url() : url, { credentials: "same-origin" });
      if (response.status === 401) {
        location.reload();  // the page itself answers the login form now
        return;
      }
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      render(body);
      document.getElementById("updated").textContent = new Date().toLocaleTimeString("en-GB");
      document.getElementById("updated").dataset.at = String(Date.now());
      status.textContent = "";
    } catch (error) {
      status.textContent = `(gateway unreachable: ${error.message}; retrying)`;
    } finally {
      setTimeout(once, POLL_MS);
    }
  }
  once();
}

function alertMarks(alerts) {
  const cell = el("td", { class: "alerts" });
  for (const alert of alerts) cell.append(el("span", { class: `mark ${alert.level}`, title: alert.text, text: alert.text }));
  if (!alerts.length) cell.append(el("span", { class: "ok", text: "ok" }));
  return cell;
}
