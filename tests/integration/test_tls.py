"""TLS and mutual TLS on both ports (reliability row 12), with certificates made by openssl."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support import ROOT, gateway_command, gateway_process


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            cwd=d,
        )


def test_mutual_tls_on_inference_and_control_ports(tmp_path: Path) -> None:
    make_pki(tmp_path)
    args = (
        "--load",
        "digits",
        "--workers",
        "1",
        "--tls-cert",
        str(tmp_path / "server.pem"),
        "--tls-key",
        str(tmp_path / "server.key"),
        "--tls-client-ca",
        str(tmp_path / "ca.pem"),
    )
    with gateway_process(*args) as server:
        ca = (tmp_path / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
        )
        with grpc.secure_channel(server.address, with_cert) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
        without_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(server.address, without_cert) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
        env = {**os.environ, "GATEWAY_CONTROL": server.control}
        ok = subprocess.run(
            gateway_command(
                "status",
                "--tls-ca",
                str(tmp_path / "ca.pem"),
                "--tls-cert",
                str(tmp_path / "client.pem"),
                "--tls-key",
                str(tmp_path / "client.key"),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
        )
        assert ok.returncode == 0, ok.stderr
        assert "digits" in ok.stdout
        refused = subprocess.run(
            gateway_command("status"), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
        )
        assert refused.returncode == 4
