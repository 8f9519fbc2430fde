"""`gateway bench`: runs the benchmark in the source checkout's loadtests/ as a program of its own.

Why a separate program rather than an import: the load tests drive the gateway
from outside (they start `gateway serve`, talk gRPC to it) and ship with the
source tree, not with the installed package. Importing them would make the
gateway depend on its own test harness and require `loadtests` to be installed
as a top-level package into site-packages. Instead this command replaces itself
(exec) with `python -m loadtests.bench ARGS`, with the checkout on the module
path, so every flag, the output, the exit code and Ctrl-C are the bench's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

import gateway

BENCH_MODULE = "loadtests.bench"


def _has_bench(root: Path) -> bool:
    return (root / "loadtests" / "bench" / "__main__.py").is_file()


def checkout_root() -> Path | None:
    """The source checkout holding loadtests/: where the gateway package itself lives (an editable
    install), else the working directory (an image that copies loadtests/ next to an installed gateway)."""
    for root in (Path(gateway.__file__).resolve().parent.parent, Path.cwd()):
        if _has_bench(root):
            return root
    return None


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
    epilog="\b\nExamples:\n  gateway bench --help                    # the bench's own options\n"
    "  gateway bench --smoke                   # a few seconds (CI runs this)\n"
    "  gateway bench --model digits --concurrency 1,16,64 --duration 3 --baselines bare,naive,gateway",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark the gateway against its baselines, side by side, and write JSON plus a PNG plot.

    `gateway bench --help` lists the options (the bench's own help).
    """
    root = checkout_root()
    if root is None:
        raise click.ClickException(
            "gateway bench runs the load tests of the source checkout (loadtests/ beside gateway/), and there "
            f"is none here: the gateway is installed at {Path(gateway.__file__).resolve().parent} and the "
            "working directory has no loadtests/bench. Run it from a clone of the repository "
            "(pip install -e . there), or run python -m loadtests.bench in one."
        )
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
    # The same interpreter, so the bench measures this install of the gateway; PYTHONPATH also reaches
    # the servers and client processes the bench starts (python -m loadtests.bare_server, for one).
    env = {**os.environ, "PYTHONPATH": path}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", BENCH_MODULE, *args], env)
