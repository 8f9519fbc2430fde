"""Live traffic for rollout tests: client threads sending real gRPC requests to a real gateway.

Each client has its own channel and sends one request after another (digits
rows from the held-out split, one row a request unless told otherwise), each
with a fresh request id and routing key; labels follow `label_delay_s` later
through the control API, as delayed ground truth does. The counts are the
client's own record, to compare with what the gateway reports.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from tests.support import MODELS

# A request: (request id, routing key) -> the message to send, and its labels (or None).
Builder = Callable[[str, str], tuple[service_pb2.ModelInferRequest, list[float] | None]]


def digits_builder(model: str = "digits", rows: int = 1, seed: int = 0) -> Builder:
    data = np.load(MODELS / "digits" / "heldout.npz")
    x, y = data["X"], data["y"]
    rng = np.random.default_rng(seed)
    lock = threading.Lock()

    def build(request_id: str, key: str) -> tuple[service_pb2.ModelInferRequest, list[float] | None]:
        with lock:
            picked = rng.integers(0, len(x), rows)
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        request.parameters["routing_key"].string_param = key
        request.inputs.add(name="pixels", datatype="FP32", shape=[rows, 64])
        request.raw_input_contents.append(x[picked].tobytes())
        return request, y[picked].astype(float).tolist()

    return build


@dataclass
class Load:
    """`clients` threads sending requests built by `build` until `stop()`."""

    address: str
    control: str
    model: str
    build: Builder
    clients: int = 3
    label_delay_s: float | None = None  # None: no labels
    metadata: tuple[tuple[str, str], ...] = ()  # sent with the labels (a control API with tokens wants one)
    prefix: str = ""  # of request ids and routing keys: several loads at once need distinct ones
    max_requests: int | None = None  # each client stops after this many answers (None: until stop())
    sent: int = 0
    failed: int = 0
    roles: dict[str, int] = field(default_factory=dict)  # answers by the role that served them
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _labels: deque[tuple[float, rpb.Feedback]] = field(default_factory=deque)

    def start(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.label_delay_s is not None:
            labeller = threading.Thread(target=self._labeller, daemon=True)
            labeller.start()
            self._threads.append(labeller)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def stop_when_done(self, timeout: float) -> None:
        """Wait for clients with `max_requests` to finish and their labels to be sent, then stop."""
        deadline = time.monotonic() + timeout
        for thread in self._threads[: self.clients]:
            thread.join(max(0.0, deadline - time.monotonic()))
        while self._labels and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the last batch the labeller took is on its way
        self.stop()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            count = 0
            while not self._stop.is_set() and (self.max_requests is None or count < self.max_requests):
                request_id = f"{self.prefix}c{index}-{count}"
                count += 1
                request, labels = self.build(request_id, request_id)
                try:
                    response = stub.ModelInfer(request, timeout=10)
                except grpc.RpcError:
                    with self._lock:
                        self.failed += 1
                    continue
                role = response.parameters["role"].string_param
                with self._lock:
                    self.sent += 1
                    self.roles[role] = self.roles.get(role, 0) + 1
                    if labels is not None and self.label_delay_s is not None:
                        due = time.monotonic() + self.label_delay_s
                        self._labels.append((due, rpb.Feedback(request_id=request_id, labels=labels)))

    def _labeller(self) -> None:
        with grpc.insecure_channel(self.control) as channel:
            control = rgrpc.ReleaseServiceStub(channel)
            while not self._stop.is_set():
                now, due = time.monotonic(), list[rpb.Feedback]()
                with self._lock:
                    while self._labels and self._labels[0][0] <= now and len(due) < 2000:
                        due.append(self._labels.popleft()[1])
                if due:
                    request = rpb.SubmitFeedbackRequest(model=self.model, items=due)
                    control.SubmitFeedback(request, timeout=10, metadata=self.metadata)
                else:
                    time.sleep(0.05)
