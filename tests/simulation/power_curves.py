"""Power curves of the promotion policy, printed as the Markdown tables in docs/promotion.md.

    .venv/bin/python -m tests.simulation.power_curves --runs 200

For latency regressions (a constant extra run time, stated as the candidate's
served p90 over the stable's) and accuracy drops, the share of simulated
rollouts rolled back and promoted, and the candidate requests (or labelled
rows) used when they were decided. The traffic model is tests/simulation/rollouts.py's;
the policy is the default one with interval_s 1 and step_min_duration_s 2.
"""

from __future__ import annotations

import argparse

import numpy as np

from gateway.config.spec import PolicySpec
from tests.simulation.rollouts import Arm, Run, Traffic, quantile_of, simulate

SPEC = PolicySpec(interval_s=1.0, step_min_duration_s=2.0, max_duration_s=1e9)


def summary(runs: list[Run]) -> str:
    n = len(runs)
    back = [r for r in runs if r.outcome == "rolled_back"]
    promoted = [r for r in runs if r.outcome == "promoted"]
    decided = back + promoted
    median = int(np.median([r.canary_requests for r in decided])) if decided else 0
    p95 = int(np.percentile([r.canary_requests for r in decided], 95)) if decided else 0
    return f"{len(back) / n:.1%} | {len(promoted) / n:.1%} | {median:,} | {p95:,}"


def latency_table(runs: int, seed: int, traffic: Traffic) -> list[str]:
    p90 = quantile_of(0.0, 0.9)
    lines = [
        "| candidate p90 / stable p90 | rolled back | promoted | canary requests, median | 95th pct |",
        "|---|---|---|---|---|",
    ]
    for ratio in (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 2.0):
        arm = Arm(extra_s=(ratio - 1) * p90)
        runs_ = simulate(SPEC, Arm(), arm, runs, seed, max_intervals=300, traffic=traffic)
        lines.append(f"| {ratio:g} | {summary(runs_)} |")
    return lines


def accuracy_table(runs: int, seed: int, bound: float) -> list[str]:
    spec = PolicySpec(
        interval_s=1.0, step_min_duration_s=2.0, max_duration_s=1e9, max_accuracy_drop=bound, max_latency_ratio=0
    )
    traffic = Traffic(per_interval=16_000)  # every request one labelled row: 16,000 labels an interval
    lines = [
        f"| accuracy drop (bound {bound:g}) | rolled back | promoted | labelled candidate rows, median | 95th pct |",
        "|---|---|---|---|---|",
    ]
    for drop in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05):
        runs_ = simulate(spec, Arm(), Arm(accuracy=0.95 - drop), runs, seed, max_intervals=300, traffic=traffic)
        lines.append(f"| {drop * 100:g} points | {summary(runs_)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--pair-noise", type=float, nargs="+", default=[0.2, 2.0], help="sd of a paired difference / median"
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    for noise in args.pair_noise:
        print(f"paired-difference noise: sd {noise:g} x the median served latency")
        for line in latency_table(args.runs, args.seed, Traffic(pair_noise=noise)):
            print(line)
        print()
    for bound in () if args.skip_accuracy else (0.0, 0.01):
        for line in accuracy_table(args.runs, args.seed, bound):
            print(line)
        print()


if __name__ == "__main__":
    main()
