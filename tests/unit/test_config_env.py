"""GATEWAY_* variables that name no setting are reported, not silently ignored."""

from __future__ import annotations

import logging

import pytest

from gateway.config.settings import load_settings


def test_a_misspelt_variable_is_reported_with_the_setting_it_resembles(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config.settings"):
        settings = load_settings(env={"GATEWAY_GRACE": "nan", "GATEWAY_STREAM_IDLE": "-1"})
    messages = [r.getMessage() for r in caplog.records]
    assert any("GATEWAY_GRACE is not a gateway setting" in m and "GATEWAY_GRACE_S" in m for m in messages), messages
    assert any("GATEWAY_STREAM_IDLE is not" in m and "GATEWAY_STREAM_IDLE_S" in m for m in messages), messages
    assert settings.grace_s == 10.0  # the default, as the warning says


def test_the_clients_own_variables_are_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config.settings"):
        load_settings(env={"GATEWAY_CONTROL": "127.0.0.1:8003", "GATEWAY_TOKEN": "x", "GATEWAY_PORT": "8001"})
    assert not caplog.records
