"""`gateway replay`: send captured live requests to a candidate version and compare its
answers with the stable answers recorded at capture time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc
import numpy as np

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.logthrottle import one_line
from gateway.percentiles import quantile
from gateway.protocol.capture import Record, capture_files, read_capture
from gateway.protocol.pb import inference_pb2 as pb
from gateway.release.compare import top1

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        t.name: np.frombuffer(raw, NUMPY_BY_DATATYPE[t.datatype]).reshape(list(t.shape))
        for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


@dataclass
class ReplayResult:
    requests: int = 0
    errors: int = 0
    exact: int = 0  # every output byte-identical to the recorded stable answer
    rows: int = 0
    agree: int = 0  # rows with the same top-1 as the recorded answer (first output)
    max_abs_diff: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    recorded_ms: list[float] = field(default_factory=list)
    error_messages: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int]:
        lat = sorted(self.latencies_ms or [0.0])
        rec = sorted(self.recorded_ms or [0.0])
        return {
            "requests": self.requests,
            "errors": self.errors,
            "exact_match": self.exact / max(1, self.requests - self.errors),
            "agreement": self.agree / self.rows if self.rows else float("nan"),
            "max_abs_diff": self.max_abs_diff,
            "p50_ms": quantile(lat, 0.5),
            "p99_ms": quantile(lat, 0.99),
            "recorded_p50_ms": quantile(rec, 0.5),
            "recorded_p99_ms": quantile(rec, 0.99),
        }

    def compare(self, recorded: bytes, answer: bytes) -> None:
        before, after = (
            outputs_of(pb.ModelInferResponse.FromString(recorded)),
            outputs_of(pb.ModelInferResponse.FromString(answer)),
        )
        same = before.keys() == after.keys() and all(
            before[k].shape == after[k].shape and before[k].tobytes() == after[k].tobytes() for k in before
        )
        self.exact += int(same)
        for name, old in before.items():
            new = after.get(name)
            if new is not None and new.shape == old.shape and old.size:
                diff = np.abs(new.astype(np.float64) - old.astype(np.float64))
                self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        first = next(iter(before), None)
        if first is not None and first in after and after[first].shape == before[first].shape:
            self.agree += int(np.count_nonzero(top1(before[first]) == top1(after[first])))
            self.rows += before[first].shape[0] if before[first].ndim else 1


async def replay(
    address: str,
    records: Sequence[Record],
    version: str,
    model: str,
    pace: str,
    concurrency: int,
    timeout_s: float = 30.0,
) -> ReplayResult:
    result = ReplayResult()
    slots = asyncio.Semaphore(concurrency)
    begin = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def one(record: Record) -> None:
            request = pb.ModelInferRequest.FromString(record.request)
            if model and request.model_name != model:
                return
            if version:
                request.model_version = version
            if pace == "original":
                await asyncio.sleep(max(0.0, begin + record.at - time.monotonic()))
            async with slots:
                start = time.perf_counter()
                try:
                    answer = await call(request.SerializeToString(), timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    result.errors += 1
                    key = f"{exc.code().name}: {exc.details()}"
                    result.error_messages[key] = result.error_messages.get(key, 0) + 1
                    return
                finally:
                    result.requests += 1
                result.latencies_ms.append((time.perf_counter() - start) * 1e3)
                result.recorded_ms.append(record.server_s * 1e3)
                result.compare(record.response, answer)

        await asyncio.gather(*(one(r) for r in records))
    return result


@click.command(
    epilog="\b\nExamples:\n  gateway replay captures/ --version 2\n"
    "  gateway replay captures/capture-20261126.gwcap --version 1 --require-exact"
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--version", default="", help="Version to replay against (pinned). [default: as captured]")
@click.option("--model", default="", help="Only this model's requests.")
@click.option("--address", default="127.0.0.1:8001", show_default=True, metavar="HOST:PORT", help="Inference port.")
@click.option(
    "--pace",
    type=click.Choice(["original", "fast"]),
    default="fast",
    show_default=True,
    help="original: the captured timing; fast: as fast as --concurrency allows.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 1024), default=16, show_default=True, help="Requests in flight at once."
)
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many requests.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@click.option("--require-exact", is_flag=True, help="Exit 1 unless every answer equals the recorded one.")
def replay_command(
    paths: tuple[Path, ...],
    version: str,
    model: str,
    address: str,
    pace: str,
    concurrency: int,
    limit: int | None,
    as_json: bool,
    require_exact: bool,
) -> None:
    """Replay captured requests (files or capture directories) and compare with the recorded stable answers."""
    records: list[Record] = []
    for path in capture_files(list(paths)):
        records.extend(read_capture(path))
        if limit and len(records) >= limit:
            records = records[:limit]
            break
    if not records:
        raise click.ClickException("no captured requests in " + ", ".join(map(str, paths)))
    click.echo(
        f"replaying {len(records)} requests against {address}"
        + (f" version {version}" if version else "")
        + f" ({pace})",
        err=True,
    )
    result = asyncio.run(replay(address, records, version, model, pace, concurrency))
    summary = result.summary()
    if as_json:
        click.echo(json.dumps({**summary, "errors_by_message": result.error_messages}, indent=2))
    else:
        for key, value in summary.items():
            click.echo(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")
        for message, count in result.error_messages.items():
            # The server's message may echo what the captured request carried: one line, escaped.
            click.echo(f"  {count} x {one_line(message)}")
    if require_exact and (summary["exact_match"] < 1.0 or result.errors):
        raise SystemExit(1)
