"""The `executors` setting: auto, off or a count, from a flag, GATEWAY_EXECUTORS or the config file;
and how many executor processes (and front-end workers) `gateway serve` starts for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import GatewaySettings, load_settings
from gateway.errors import ConfigError
from gateway.server.workers import executor_count, front_end, worker_count


@pytest.mark.parametrize(
    ("given", "read"),
    [("auto", "auto"), ("AUTO", "auto"), ("off", "off"), ("0", "off"), ("1", 1), (0, "off"), (1, 1)],
)
def test_values_read_from_a_flag_or_a_file(given: object, read: object) -> None:
    assert load_settings(overrides={"executors": given}).executors == read


def test_the_environment_and_a_toml_number(tmp_path: Path) -> None:
    assert load_settings(env={"GATEWAY_EXECUTORS": "1"}).executors == 1
    config = tmp_path / "gateway.toml"
    config.write_text("executors = 1\n")
    assert load_settings(config, env={}).executors == 1
    config.write_text('executors = "off"\n')
    assert load_settings(config, env={}).executors == "off"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("2", "executors: 2: one executor process is supported so far (it owns one device); use 1, auto or off"),
        ("many", "executors: 'many' is not auto, off or a number of executor processes (0, 1)"),
        (-1, "executors: -1 is not auto, off or a number"),
    ],
)
def test_refusals_name_the_setting_and_the_fix(given: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(overrides={"executors": given})


def test_a_refused_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_EXECUTORS: executors: 3"):
        load_settings(env={"GATEWAY_EXECUTORS": "3"})


def test_auto_is_off_on_a_cpu_host_and_one_starts_front_ends_on_every_core() -> None:
    assert executor_count(GatewaySettings(provider="cpu")) == 0
    assert executor_count(GatewaySettings(provider="cpu", executors="off")) == 0
    one = GatewaySettings(provider="cpu", executors=1)
    assert executor_count(one) == 1
    assert worker_count(one) >= 1
    assert worker_count(GatewaySettings(provider="cpu", executors=1, workers=3)) == 3
    # A worker of such a gateway runs its models through the executor and starts none itself.
    worker = front_end(one, "@gateway-1-exec0", 3)
    assert executor_count(worker) == 0
    assert (worker.executor_address, worker.provider, worker.intra_op_threads) == ("@gateway-1-exec0", "cpu", 1)
    assert worker.executor_front_ends == 3  # its share of each model's one queue (the capacity metric)
