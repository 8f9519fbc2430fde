"""The Python gRPC limit: a grpc.aio server whose ModelInfer answers one pre-built response.

No compute, no validation, and by default no protobuf either (bytes in, the
same bytes out), so whatever the gateway does beyond this is the cost of
serving. The response has the model's outputs (names, datatypes, shapes for
--rows rows), zero-filled, so clients cannot tell it from the real thing.

    python -m loadtests.bare_server --models models --model digits --port 0

prints `listening on HOST:PORT` like `gateway serve`, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from gateway.protocol.pb import inference_pb2 as pb
from gateway.server import launch
from loadtests.loadgen import MAX_MESSAGE_BYTES
from loadtests.signature import ModelSignature, load_signature

SERVICE = "inference.GRPCInferenceService"


def build_response(signature: ModelSignature, rows: int) -> bytes:
    response = pb.ModelInferResponse(model_name=signature.name, model_version=signature.version)
    for tensor in signature.outputs:
        shape = tensor.concrete_shape(rows)
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        response.raw_output_contents.append(bytes(math.prod(shape) * tensor.dtype.itemsize))
    data: bytes = response.SerializeToString()
    return data


def _handlers(response: bytes, parse: bool) -> dict[str, Any]:
    if parse:
        message = pb.ModelInferResponse.FromString(response)

        async def infer_parsed(request: pb.ModelInferRequest, context: Any) -> Any:
            return message

        handler = grpc.unary_unary_rpc_method_handler(
            infer_parsed,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
    else:

        async def infer(request: bytes, context: Any) -> bytes:
            return response

        handler = grpc.unary_unary_rpc_method_handler(infer, request_deserializer=None, response_serializer=None)
    return {"ModelInfer": handler}


async def serve(host: str, port: int, response: bytes, parse: bool, workers: int, argv: list[str]) -> None:
    server = aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    handlers = _handlers(response, parse)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Registered methods skip the per-call method lookup, as the generated stubs (and so the gateway) do.
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"bare_server: cannot listen on {host}:{port}")
    await server.start()
    children = start_workers("loadtests.bare_server", argv, bound, workers - 1)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"listening on {host}:{bound}", flush=True)
    await stopped.wait()
    for child in children:
        child.proc.terminate()
    await server.stop(1.0)
    for child in children:
        child.proc.wait(10)


def start_workers(module: str, argv: list[str], port: int, count: int) -> list[launch.Launched]:
    """`count` more processes of `python -m module` with `argv` (its own command line) on `port`.

    They bind the port the first process got; SO_REUSEPORT lets the kernel spread connections.
    Each is started once it says `listening on`, so none of the clients' connections miss it.
    """
    args = [*_without(argv, {"--port", "--workers"}), "--port", str(port), "--workers", "1"]
    workers = []
    for _ in range(count):
        try:
            workers.append(launch.start([sys.executable, "-m", module, *args]))
        except launch.LaunchError as exc:
            for worker in workers:
                worker.stop()
            raise SystemExit(f"{module}: a worker did not start: {exc}") from None
    return workers


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bare_server",
        description="A grpc.aio ModelInfer that answers a fixed response: the Python gRPC limit (no compute).",
    )
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--model", default="digits", help="model whose outputs the response mimics")
    parser.add_argument("--version", default=None, help="model version (default: release.stable, else highest)")
    parser.add_argument("--rows", type=int, default=1, help="rows in the response's batch dimension")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--parse", action="store_true", help="parse requests and serialize responses with protobuf")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="uvloop when importable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    signature = load_signature(args.models, args.model, args.version)
    response = build_response(signature, args.rows)
    coroutine = serve(args.host, args.port, response, args.parse, max(1, args.workers), raw)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            asyncio.run(coroutine)
        else:
            uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


def _without(argv: list[str], options: set[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    main()
