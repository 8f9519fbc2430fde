"""`gateway demo`, end to end: v2 promoted step by step, v3 rolled back, the audit trail printed."""

from __future__ import annotations

import os
import subprocess

from tests.support import ROOT, gateway_command


def test_demo_promotes_v2_and_rolls_back_v3() -> None:
    result = subprocess.run(
        gateway_command("demo"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "v2 promoted: stable is now 2" in out
    assert "v3 rolled back: stable stays 2" in out
    audit = out[out.index("audit trail") :]
    assert audit.count("advance") >= 3  # every step of the policy: 10 %, 25 %, 50 %, then promote
    assert "promote" in audit and "rollback" in audit and "accuracy fail" in audit
    assert "(0 errors)" in out
