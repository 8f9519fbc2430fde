// `/`: every model's release and rollout at a glance, refreshed in place.
"use strict";

function renderOverview(body) {
  const rows = body.models.map((m) => {
    const level = m.alerts.some((a) => a.level === "red") ? "red" : m.alerts.length ? "amber" : "";
    const shadows = Object.entries(m.shadows).map(([v, p]) => `v${v} (${fmt(p, 3)} %)`).join(", ") || "–";
    return el(
      "tr",
      { "data-model": m.model, "data-phase": m.phase, "data-step": m.step === null ? "" : String(m.step), "data-alert": level, class: level },
      el("td", {}, el("a", { href: `/models/${encodeURIComponent(m.model)}`, text: m.model })),
      el("td", { text: `v${m.stable}` }),
      el("td", { text: m.canary ? `v${m.canary}` : "–" }),
      el("td", { text: m.canary ? `${fmt(m.weight_pct, 3)} %` : "–" }),
      el("td", { text: shadows }),
      el("td", { class: `phase ${m.phase}`, text: (m.candidate && m.phase !== "idle" ? `${m.phase} (v${m.candidate})` : m.phase) + (m.awaiting_approval ? `, ${awaiting(m.awaiting_approval)}` : "") }),
      el("td", { text: m.step === null ? "–" : String(m.step) }),
      el("td", { text: m.next || "–" }),
      alertMarks(m.alerts),
    );
  });
  document.getElementById("models").replaceChildren(...rows);
  document.getElementById("overview").dataset.models = String(rows.length);
}

poll("/api/overview", renderOverview);
