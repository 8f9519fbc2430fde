"""The executor process's shadow gate and catalog, in isolation.

The gate: a shadow's turn comes only with no primary in the executor, one shadow at a
time; past the bound a shadow is shed, and one that waits past its deadline is late.
The catalog: a load builds only when the model's files changed; a version no front
end holds retires (an old generation when its last holder moves on or leaves, the
current one when its last holder releases it). The real executor process is
exercised in tests/integration/test_remote_executor.py and test_serve_executors_*.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gateway.errors import ShadowLate, ShadowShed
from gateway.serving.remote.catalog import Catalog, fingerprint
from gateway.serving.remote.priority import ShadowGate
from gateway.serving.remote.server import Served
from gateway.types import RunTiming, Tensors


def test_a_shadow_waits_for_the_last_primary_and_shadows_run_one_at_a_time() -> None:
    async def scenario() -> None:
        gate = ShadowGate()
        gate.primary_started()
        gate.primary_started()
        first = asyncio.ensure_future(gate.admit(None))
        second = asyncio.ensure_future(gate.admit(None))
        await asyncio.sleep(0.01)
        assert not first.done() and gate.waiting == 2
        gate.primary_ended()
        await asyncio.sleep(0.01)
        assert not first.done()  # one primary is still in the executor
        gate.primary_ended()
        await asyncio.sleep(0.01)
        assert first.done() and not second.done()  # the second waits for the first's run
        gate.done()
        await asyncio.wait_for(second, 1)
        gate.done()
        assert gate.counts.run == 2

    asyncio.run(scenario())


def test_past_the_bound_a_shadow_is_shed_and_past_its_deadline_it_is_late() -> None:
    async def scenario() -> None:
        gate = ShadowGate(max_waiting=2)
        gate.primary_started()
        waiting = [asyncio.ensure_future(gate.admit(time.monotonic() + 0.1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ShadowShed):
            await gate.admit(time.monotonic() + 5)
        for task in waiting:
            with pytest.raises(ShadowLate):
                await task
        assert gate.counts.shed == 1 and gate.counts.late == 2 and gate.waiting == 0

    asyncio.run(scenario())


class Runner:
    """An executor stand-in that only records that it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
    ) -> list[object]:
        raise AssertionError("not run here")

    def queue_depth(self) -> int:
        return 0

    def busy(self) -> bool:
        return False

    async def close(self) -> None:
        self.closed = True


def served(model: str, version: str, runner: Runner) -> Served:
    return Served(0, model, version, (), (), runner)  # type: ignore[arg-type]


def test_loads_build_only_changed_files_and_unheld_versions_retire(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    onnx = model_dir / "1" / "model.onnx"
    onnx.write_bytes(b"first")
    runners: list[Runner] = []

    async def build(name: str) -> list[Served]:
        runners.append(Runner())
        return [served(name, "1", runners[-1])]

    async def scenario() -> None:
        start = Runner()
        catalog = Catalog([served("m", "1", start)], {"m": fingerprint(model_dir)}, build, lambda _: model_dir)
        a, b = object(), object()  # two front ends
        (v0,) = await catalog.load("m")  # files unchanged since the start: nothing built
        assert v0.id == 0 and not runners
        catalog.hold(a, 0)
        catalog.hold(b, 0)

        onnx.write_bytes(b"second, longer")
        os.utime(onnx, ns=(time.time_ns(), time.time_ns() + 10**9))
        (v1,) = await catalog.load("m")
        assert v1.id == 1 and len(runners) == 1
        assert [v.id for v in catalog.current_versions()] == [1]
        (again,) = await catalog.load("m")  # the second front end's load of the same files
        assert again.id == 1 and len(runners) == 1
        catalog.hold(a, 1)
        catalog.release(a, 0)
        await asyncio.sleep(0.05)
        assert catalog.get(0) is not None and not start.closed  # b still holds the old one
        catalog.drop(b)  # b leaves: the old generation goes, the current one stays
        await asyncio.sleep(0.05)
        assert catalog.get(0) is None and start.closed and catalog.get(1) is not None

        catalog.release(a, 1)  # the last holder unloads: the model leaves the executor
        await asyncio.sleep(0.05)
        assert catalog.get(1) is None and runners[0].closed and not catalog.current_versions()
        (v2,) = await catalog.load("m")  # a later load builds it afresh
        assert v2.id == 2 and len(runners) == 2
        await catalog.close()

    asyncio.run(scenario())
