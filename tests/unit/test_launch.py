"""The one launcher of servers: a child that exits before it listens is named, whatever the timeout."""

from __future__ import annotations

import sys

import pytest

from gateway.server import launch


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_a_child_that_exits_before_listening_is_reported_with_its_output(timeout_s: float | None) -> None:
    command = [sys.executable, "-c", "print('refusing: the state folder is in use')"]
    with pytest.raises(launch.LaunchError) as refused:
        launch.start(command, timeout_s=timeout_s)
    # Without a timeout this used to end in TypeError (formatting None as the time waited).
    assert "exited before listening" in str(refused.value)
    assert "refusing: the state folder is in use" in str(refused.value)
