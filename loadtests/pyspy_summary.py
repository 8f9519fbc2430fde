"""Where a server's time goes, from a py-spy profile: shares by area, then the busiest lines.

Take the profile on a server under load (docs/performance.md has the whole recipe):

    py-spy record --nonblocking -r 250 -d 10 -f raw -o gateway.txt --pid PID
    python -m loadtests.pyspy_summary gateway.txt

`-f raw` writes one line per distinct stack ("frame;frame;...;frame COUNT"). Each
sample is charged to the area of its innermost frame: a sample whose innermost
Python frame is the event loop's `run_forever` is time in native code under the
loop (uvloop, grpc's Cython, asyncio's C tasks), since Cython functions have no
Python frame of their own; one in `Thread.run` is grpc's poller thread (or
another thread) in native code.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# (substring of the innermost frame, area), first match wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("gateway/protocol/", "protocol: parse checks, decode, encode, error mapping"),
    ("gateway/serving/batcher", "serving: batcher"),
    ("gateway/serving/validation", "serving: validation, arrays"),
    ("gateway/serving/", "serving: other"),
    ("gateway/release/", "release: routing, evidence, shadows"),
    ("gateway/dataplane", "dataplane"),
    ("onnxruntime", "onnxruntime (model runs)"),
    ("prometheus_client", "prometheus counters"),
    ("numpy", "numpy"),
    ("asyncio/runners.py", "event loop + grpc, native (uvloop, grpc Cython, C tasks)"),
    ("Runner.run", "event loop + grpc, native (uvloop, grpc Cython, C tasks)"),
    ("threading.py", "other threads, native (grpc poller)"),
    ("asyncio/", "asyncio, Python"),
    ("grpc/", "grpc, Python"),
)


def read_raw(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy's raw format: each line a ';'-joined stack, a space, a sample count."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"not py-spy raw output (expected 'frames COUNT'): {line[:80]!r}")
        stacks.append((stack.split(";"), int(count)))
    return stacks


def area_of(frame: str) -> str:
    for needle, area in AREAS:
        if needle in frame:
            return area
    return "other"


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples"
    areas: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for frames, count in stacks:
        leaf = frames[-1]
        areas[area_of(leaf)] += count
        if "gateway/" in leaf:
            lines[leaf] += count
    out = [f"{total} samples", "", "share  area"]
    out += [f"{count / total:5.1%}  {area}" for area, count in areas.most_common()]
    out += ["", f"share  busiest lines of gateway/ (top {top})"]
    out += [f"{count / total:5.1%}  {line}" for line, count in lines.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.pyspy_summary", description="Shares by area of a py-spy raw profile."
    )
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=15, help="busiest gateway lines to list (default 15)")
    args = parser.parse_args(argv)
    try:
        text = args.profile.read_text()
        print(summarize(read_raw(text.splitlines()), args.top))
    except (OSError, ValueError) as exc:
        sys.exit(f"pyspy_summary: {args.profile}: {exc}")


if __name__ == "__main__":
    main()
