"""The server a user would write first: the `naive` baseline of `gateway bench`.

A grpc.aio servicer from the generated stubs whose ModelInfer turns
raw_input_contents into numpy arrays, runs one onnxruntime session in the
default thread pool, and answers raw_output_contents. No batching, no queue,
no validation, no versions, no metrics; plain asyncio (what a user writes
first; `--loop uvloop` for the faster loop, which the gateway uses: measured
1.2x this server's throughput on digits at c=64). Whatever the gateway does
beyond this is what its serving costs, or gains, over the obvious code.

    python -m loadtests.naive_server --models models --model digits --port 0

prints `listening on HOST:PORT` like `gateway serve`, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from grpc import aio

from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from loadtests.bare_server import start_workers
from loadtests.loadgen import MAX_MESSAGE_BYTES
from loadtests.signature import load_signature

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


class Inference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        feeds = {
            tensor.name: np.frombuffer(raw, dtype=DTYPES[tensor.datatype]).reshape(tensor.shape)
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(None, self.session.run, None, feeds)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, result in zip(self.output_names, results, strict=True):
            response.outputs.add(name=name, datatype=DATATYPES[result.dtype], shape=result.shape)
            response.raw_output_contents.append(result.tobytes())
        return response


async def serve(args: argparse.Namespace, argv: list[str]) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings on stdout
    options.intra_op_num_threads = args.intra_op_threads  # 0: onnxruntime's default
    path = load_signature(args.models, args.model, args.version).path
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    server = aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(session), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    # --workers N: N-1 more processes on the same port, as bare_server (and `gateway serve`) run them.
    workers = start_workers("loadtests.naive_server", argv, port, args.workers - 1)
    print(f"listening on {args.host}:{port}", flush=True)

    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopped.set)
    await stopped.wait()
    for worker in workers:
        worker.proc.terminate()
    await server.stop(1.0)
    for worker in workers:
        worker.proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.naive_server",
        description="The obvious grpc.aio + onnxruntime ModelInfer server: the bench's `naive` baseline.",
    )
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--model", default="digits", help="model to serve")
    parser.add_argument("--version", default=None, help="model version (default: release.stable, else highest)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop (default asyncio)")
    args = parser.parse_args(raw)
    if args.workers < 1 or args.intra_op_threads < 0:
        parser.error("--workers must be >= 1 and --intra-op-threads >= 0")
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args, raw))
    else:
        asyncio.run(serve(args, raw))


if __name__ == "__main__":
    main()
