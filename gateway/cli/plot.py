"""`gateway report --plot`: a rollout over time, from the audit log, as PNG.

Top: the canary weight after each change. Bottom: the accuracy difference
(candidate - stable) and the other checks' values at each decision, with
their confidence intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.control.client import EXIT_REFUSED, CommandFailed
from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.store import AuditOutcome


def plot_rollout(model: str, records: list[rpb.AuditRecord], report: rpb.Report, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CommandFailed("--plot needs matplotlib: pip install matplotlib", EXIT_REFUSED) from None
    if not records:
        raise CommandFailed(f"{model} has no audit records to plot", EXIT_REFUSED)
    start = records[0].at
    times, weights = [], []
    checks: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in records:
        if r.outcome != AuditOutcome.APPLIED or not r.after_json:
            continue
        after = json.loads(r.after_json)
        times.append(r.at - start)
        weights.append(after.get("canary_weight_bp", 0) / 100 if after.get("canary") else 0.0)
        for c in json.loads(r.evidence_json) if r.evidence_json else []:
            if c.get("value") is not None:
                low = c["low"] if c.get("low") is not None else c["value"]
                high = c["high"] if c.get("high") is not None else c["value"]
                checks.setdefault(c["check"], []).append((r.at - start, c["value"], low, high))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step(times, weights, where="post", color="tab:blue")
    top.set_ylabel("canary weight (%)")
    top.set_ylim(-2, 102)
    r = report.release
    top.set_title(f"{model}: stable {r.stable}, phase {r.phase or 'idle'} (revision {r.revision})")
    for name, points in sorted(checks.items()):
        xs = [p[0] for p in points]
        bottom.errorbar(
            xs,
            [p[1] for p in points],
            yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]],
            marker="o",
            capsize=3,
            label=name,
        )
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("check value (95% CS)")
    bottom.set_xlabel("seconds since the first record")
    if checks:
        bottom.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
