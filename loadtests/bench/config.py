"""What one bench run does, resolved from the command line (or built by loadtests.gpu_bench)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TARGETS = (
    "ort",
    "bare",
    "naive",
    "gateway-nobatch",
    "gateway",
    "gateway-exec",
    "gateway-shadow",
    "gateway-rest-json",
    "gateway-rest-binary",
)
# The gateway as configured, driven over its REST binding instead of gRPC, per body format.
REST_TARGETS: dict[str, Literal["json", "binary"]] = {"gateway-rest-json": "json", "gateway-rest-binary": "binary"}
DEFAULT_TARGETS = "ort,bare,naive,gateway-nobatch,gateway"
# The gateway with one executor process (`gateway serve --executors 1`): every worker hands its
# requests to it and it batches them together. Every other gateway target runs `--executors off`,
# so `gateway` against `gateway-exec` is in-process against executor mode, whatever the host.
EXECUTOR_TARGETS = frozenset({"gateway-exec"})


@dataclass(slots=True, kw_only=True)
class BenchConfig:
    models: Path
    model: str
    version: str | None = None
    rows: int = 1
    concurrency: list[int]
    rates: list[float]
    duration_s: float
    warmup_s: float
    repeats: int
    processes: int
    channels: int = 4
    # Run in this order each repeat; "vA" (from --compare) is the gateway with requests pinned to version A.
    targets: list[str]
    workers: int | None = None
    # gateway-exec's `--workers` where it differs from the other targets' (loadtests.gpu_bench: twelve
    # front ends and one executor against one in-process worker); None: the same as `workers`.
    exec_workers: int | None = None
    intra_op_threads: int = 0
    # gateway-exec's onnxruntime threads (its executor's): 0 is onnxruntime's default.
    exec_intra_op_threads: int = 0
    out: Path
    smoke: bool = False
    server_cpus: list[int] | None
    client_cpus: list[int] | None
    pinning: str
    request_timeout_s: float
    shadow: str | None = None
    provider: str = "cpu"

    def estimate_s(self) -> float:
        point = self.warmup_s + self.duration_s + 0.15
        servers = [t for t in self.targets if t != "ort"]
        ort = (len(self.ort_concurrency()) * point + 0.5) if "ort" in self.targets else 0.0
        per_repeat = ort + len(servers) * ((len(self.concurrency) + len(self.rates)) * point + 1.0)
        return self.repeats * per_repeat + 2.0

    def ort_concurrency(self) -> list[int]:
        # Batch `rows` (c=1) is the per-request compute limit; keep it even if the sweep skips c=1.
        return sorted({1, *self.concurrency})
