"""`gateway demo`'s notification: a local webhook receiver, and the [[notify]] table pointing at it.

The receiver is a plain HTTP server on 127.0.0.1 (a port the OS picks) that checks
each POST's signature with the key the gateway signs with, as a real receiver would.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.release.notify import signing

# The events the demo asks for: one of each rollout's start and end.
DEMO_EVENTS = ("rollout_started", "promoted", "rolled_back")


@dataclass
class Received:
    event: dict[str, Any]
    verified: bool


@dataclass
class DemoReceiver:
    key: bytes
    got: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stamp = self.headers.get(signing.TIMESTAMP_HEADER, "")
                sent = self.headers.get(signing.SIGNATURE_HEADER, "")
                verified = signing.verify(receiver.key, stamp, sent, body, time.time())
                with receiver._lock:
                    receiver.got.append(Received(json.loads(body), verified))
                self.send_response(204 if verified else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # the demo prints its own lines
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="demo-receiver", daemon=True).start()
        return int(self._server.server_address[1])

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def demo_config(workdir: Path) -> tuple[Path, DemoReceiver]:
    """A started receiver and the gateway config (with its key in a file of its own) that notifies it."""
    key = secrets.token_hex(16)
    key_file = workdir / "notify.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    receiver = DemoReceiver(key.encode())
    port = receiver.start()
    config = workdir / "gateway.toml"
    events = ", ".join(f'"{e}"' for e in DEMO_EVENTS)
    config.write_text(
        "# Written by `gateway demo`: rollout events to a local webhook receiver.\n"
        f'[[notify]]\nname = "demo-receiver"\nurl = "http://127.0.0.1:{port}/hook"\n'
        f'secret_file = "{key_file}"\nevents = [{events}]\n'
    )
    return config, receiver


def describe(received: list[Received]) -> list[str]:
    """What the receiver got, a line each: the event, its model and release, and the signature check."""
    lines = []
    for item in received:
        event, release = item.event, item.event.get("release", {})
        check = "signature verified" if item.verified else "SIGNATURE INVALID"
        lines.append(
            f"  {event.get('event')}: {event.get('model')} stable v{release.get('stable', '?')}, "
            f"candidate v{release.get('candidate') or '-'} by {event.get('actor')} ({check})"
        )
    return lines
