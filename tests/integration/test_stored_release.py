"""A stored release outlives model.toml edits, and the gateway says so when they differ."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tests.support import MODELS, gateway_in_thread


def test_an_edited_spec_release_is_reported_and_the_stored_one_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "digits", repo / "digits")
    state = tmp_path / "state"
    with gateway_in_thread(repo, state_dir=state) as running:
        assert running.gateway.releases is not None
        assert running.gateway.releases.table.get("digits").stable == "1"

    spec = repo / "digits" / "model.toml"
    spec.write_text(spec.read_text().replace('stable = "1"', 'stable = "2"\nshadows = { "3" = 0.5 }'))
    with (
        caplog.at_level(logging.WARNING, logger="gateway.release.operations"),
        gateway_in_thread(repo, state_dir=state) as running,
    ):
        assert running.gateway.releases is not None
        served = running.gateway.releases.table.get("digits")
    assert (served.stable, dict(served.shadows)) == ("1", {})  # the stored release wins
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "model.toml's [release] (stable 2, shadow 3 at 50%) differs from the stored release (stable 1" in w
        for w in warnings
    ), warnings

    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="gateway.release.operations"),
        gateway_in_thread(repo, state_dir=tmp_path / "fresh") as running,
    ):
        assert running.gateway.releases is not None
        assert running.gateway.releases.table.get("digits").stable == "2"  # a fresh store takes the spec's
    assert not [r for r in caplog.records if "differs" in r.getMessage()]
