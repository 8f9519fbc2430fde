"""A replica's name in the shared store: set, checked, or HOST-PID; and a process's name there."""

from __future__ import annotations

import os
import socket

import pytest

from gateway.config.settings import GatewaySettings, resolved_replica_id
from gateway.errors import ConfigError
from gateway.release.sync import member_name


@pytest.mark.parametrize("bad", ["has space", "-leading-dash", "a/b", "x" * 64, "ünïcode"])
def test_a_replica_id_that_is_not_a_name_is_refused_naming_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^replica_id: .* is not a replica name"):
        GatewaySettings(replica_id=bad)


def test_the_default_is_this_host_and_process_and_a_set_one_is_kept() -> None:
    assert resolved_replica_id(GatewaySettings(replica_id="gateway-7d9f-x2k4")) == "gateway-7d9f-x2k4"
    default = resolved_replica_id(GatewaySettings())
    assert default.endswith(f"-{os.getpid()}") and default[0].isalnum()
    assert socket.gethostname().split(".")[0][:8] in default or not socket.gethostname()[0].isalnum()
    GatewaySettings(replica_id=default)  # a valid name itself


def test_a_process_shares_through_the_store_when_it_has_peers() -> None:
    assert member_name("r1", -1, shared_store=False) is None  # one process on SQLite: nobody to share with
    assert member_name("r1", -1, shared_store=True) == "r1/0"  # one process, but other replicas
    assert member_name("r1", 3, shared_store=False) == "r1/3"  # workers of one host
