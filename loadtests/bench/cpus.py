"""Which CPUs the server and the clients get, how a child is pinned to them, and CPU time from /proc."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


def parse_cpus(text: str) -> list[int]:
    """`0-3,6` -> [0, 1, 2, 3, 6] (the taskset/cpuset list syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high) if high else int(low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(cpus)


def format_cpus(cpus: Sequence[int]) -> str:
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], -2]:
        if cpu != prev + 1:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            start = cpu
        prev = cpu
    return ",".join(ranges)


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """The server's and the clients' CPUs (None: any) and how they were chosen, in words."""

    server: list[int] | None
    client: list[int] | None
    how: str


def choose_cpus(server: str | None, client: str | None) -> CpuPlan:
    """As given; else the server on the first half of the cores and the clients on the rest.

    Raises ValueError for a malformed list or CPUs this process may not use.
    """
    available = sorted(os.sched_getaffinity(0))
    if server or client:
        plan = CpuPlan(parse_cpus(server) if server else None, parse_cpus(client) if client else None, "as given")
    elif len(available) >= 2:
        half = len(available) // 2
        plan = CpuPlan(available[:half], available[half:], "server on the first half of the cores, clients on the rest")
    else:
        return CpuPlan(None, None, "none (fewer than 2 cores: server and clients share the CPU)")
    for cpus in (plan.server, plan.client):
        if cpus and not set(cpus) <= set(available):
            raise ValueError(f"CPUs {format_cpus(cpus)} are not all available (have {format_cpus(available)})")
    if plan.server and plan.client and set(plan.server) & set(plan.client):
        return CpuPlan(plan.server, plan.client, plan.how + "; WARNING: server and client CPU sets overlap")
    return plan


def pinning(cpus: Sequence[int] | None) -> tuple[list[str], Callable[[], None] | None]:
    """How to start a child on `cpus`: a command prefix (taskset), else a preexec function; neither for None."""
    if not cpus:
        return [], None
    if shutil.which("taskset"):
        return ["taskset", "-c", format_cpus(cpus)], None
    pinned = list(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, pinned)

    return [], pin


def pinning_tool() -> str:
    return "taskset" if shutil.which("taskset") else "sched_setaffinity"


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its live descendants, from /proc (workers are children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def busy_cpu_seconds(cpus: Iterable[int]) -> float:
    """Time these CPUs spent busy (user, nice, system, irq, softirq, steal), from /proc/stat; NaN without it."""
    ticks = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{cpu}" for cpu in cpus}
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                    total += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return math.nan
    return total / ticks
