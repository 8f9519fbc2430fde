"""`gateway demo`, end to end: the policy told in words, v2 promoted step by step with a line of
evidence per decision, v3 rolled back with the failing check named, the audit trail printed."""

from __future__ import annotations

import os
import re
import subprocess

from tests.support import ROOT, gateway_command


def test_demo_promotes_v2_and_rolls_back_v3() -> None:
    result = subprocess.run(
        gateway_command("demo"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        # Wide enough that no story line wraps: each is asserted whole below.
        env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout

    # The policy it uses, in words, before anything happens (DEMO_POLICY's settings).
    policy = out[: out.index("starting a gateway")]
    assert "steps       10 % → 25 % → 50 % of the traffic to the candidate" in policy
    assert "100 candidate requests and 2 s of its own" in policy
    assert "error rate at most 5 points above the stable's" in policy
    assert "accuracy on labelled rows at most 2 points below" in policy
    assert "latency" not in policy  # max_latency_ratio = 0: the demo policy checks no latency
    assert "95% for all checks together (alpha 0.05)" in policy
    assert "decides every 1 s; one failed check rolls back; no decision in 120 s: pause" in policy

    v2 = out[out.index("rollout of digits v2") : out.index("v2 promoted")]
    v3 = out[out.index("rollout of digits v3") : out.index("v3 rolled back")]
    assert "trying: v2, an MLP more accurate than v1" in v2
    assert "trying: v3, a linear model trained on corrupted labels: deliberately worse" in v3

    # A line per decision, with the controller's reason, then its evidence against the bounds.
    steps = re.findall(r"advance at (\d+) % → (\d+) %: checks passed at (step \d/3|the last step)", v2)
    assert steps == [("10", "25", "step 1/3"), ("25", "50", "step 2/3"), ("50", "100", "the last step")], v2
    evidence = re.findall(r"^ +evidence: (.*)$", v2, re.MULTILINE)
    assert len(evidence) == 4 and evidence[-1] == "as above", evidence  # the promotion repeats the last step's
    for line in evidence[:3]:
        assert re.search(r"accuracy [-+]\d+\.\d \[[-+]\d+\.\d, [-+]\d+\.\d\] pts ≥ -2 pts pass", line), line
        assert re.search(r"error_rate [-+]\d+\.\d \[.*\] pts ≤ \+5 pts pass", line), line
        assert re.search(r"step_requests \d+ of 100; step_duration_s \d+\.\d s of 2 s", line), line
    assert re.search(r"promote at 100 % → v2 stable: all steps passed", v2), v2
    assert "v2 promoted: stable is now 2" in out
    assert "why: every check passed on the whole rollout's evidence at each of its 3 steps" in out

    [rollback] = re.findall(r"rollback at 10 % → 0 %: failed checks: (.*)$", v3, re.MULTILINE)
    assert "accuracy" in rollback, v3
    # Either accuracy check may be the one that fails first (the paired one usually is).
    assert re.search(r"evidence: .*accuracy(_paired)? -\d+\.\d \[.*\] pts ≥ -2 pts fail", v3), v3
    assert "v3 rolled back: stable stays 2" in out
    why = re.search(r"^why: at 10 % of the traffic, (.*)$", out[out.index("v3 rolled back") :], re.MULTILINE)
    assert why is not None, out[out.index("v3 rolled back") :]
    failing = r"accuracy(_paired)? failed: -\d+\.\d \[.*\] pts, the whole interval below the bound -2 pts"
    assert re.search(failing, why[1]), why[1]

    # One notification: a local webhook receiver got each rollout's start and end, signed.
    notified = out[out.index("a local webhook receiver") : out.index("audit trail")]
    events = re.findall(
        r"^  (\w+): digits stable v(\d), candidate v(\d) by (\w+) \(signature verified\)$", notified, re.M
    )
    assert events == [
        ("rollout_started", "1", "2", "anonymous"),
        ("promoted", "2", "2", "controller"),
        ("rollout_started", "2", "3", "anonymous"),
        ("rolled_back", "2", "3", "controller"),
    ], notified
    # One routing rule: the internal tenant reaches v3 (rolled back for everyone else), counted apart.
    rule = out[out.index("a routing rule") : out.index("audit trail")]
    assert "rule 1. internal: param tenant = 'internal' -> version 3" in rule, rule
    assert "tenant=internal: 20 requests served by v3; other tenants: 20 requests served by v2 (the split)" in rule
    assert re.search(r"counted apart: rule internal -> v3: 20 requests, in no canary comparison", rule), rule

    audit = out[out.index("audit trail") :]
    assert "add_route" in audit
    assert audit.count("advance") >= 3  # every step of the policy: 10 %, 25 %, 50 %, then promote
    assert "promote" in audit and "rollback" in audit and re.search(r"accuracy(_paired)? fail", audit)
    assert "(0 errors)" in out
    # Its work folder (a model copy and a state store a run) is gone: runs used to pile them up.
    assert "work files removed" in out
    workdir = re.search(r"state in (\S+)/state\)", out)
    assert workdir is not None and not os.path.exists(workdir[1]), out[:2000]
