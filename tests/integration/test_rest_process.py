"""`gateway serve` with the REST binding: its address reported, shared by --workers, its port its own.

With --workers N every worker serves HTTP on the one port (SO_REUSEPORT, as the
gRPC port); a second gateway on that port is refused with one line naming
--http-port, as for every other port (gateway/server/ports.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.rest_support import infer_body, tensor
from tests.integration.test_process_ports import fresh_state, second_gateway
from tests.integration.test_tls import make_pki
from tests.support import gateway_process


@pytest.mark.parametrize("workers", ["1", "2"])
def test_workers_share_the_http_port_and_a_second_gateway_on_it_is_refused(workers: str) -> None:
    with gateway_process("--load", "digits", "--workers", workers) as first:
        assert first.http and first.http != first.address
        body = infer_body(tensor("pixels", np.zeros((1, 64), np.float32)))
        for _ in range(12):  # a fresh connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=f"http://{first.http}", timeout=30) as client:
                assert client.post("/v2/models/digits/infer", json=body).status_code == 200
        http_port = first.http.rsplit(":", 1)[1]
        code, output = second_gateway(
            "--port", "0", "--http-port", http_port, "--control-port", "0", "--workers", workers,
            "--state-dir", fresh_state(),
        )  # fmt: skip
        assert code is not None and code != 0, output
        assert f"HTTP port {http_port} is in use (another gateway?)" in output, output
        assert "--http-port (0 picks a free one, -1 turns the REST binding off)" in output, output
        with httpx.Client(base_url=f"http://{first.http}", timeout=30) as client:
            assert client.get("/v2/health/ready").status_code == 200
        assert first.stop() == 0


def test_http_port_minus_one_turns_rest_off() -> None:
    with gateway_process("--load", "digits", "--workers", "1", "--http-port", "-1") as server:
        assert server.http == ""
        assert not any("http on" in line for line in server.lines)


def test_mutual_tls_on_the_http_port_too(tmp_path: Path) -> None:
    make_pki(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    with gateway_process("--load", "digits", "--workers", "1", *tls, "--tls-client-ca", str(tmp_path / "ca.pem")) as s:
        url = f"https://{s.http}/v2/health/ready"
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with_cert.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        assert httpx.get(url, verify=with_cert, timeout=30).status_code == 200
        without_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=without_cert, timeout=30)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{s.http}/v2/health/ready", timeout=30)
