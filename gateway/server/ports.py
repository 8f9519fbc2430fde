"""Making sure a port the gateway listens on is its own.

Workers of one supervisor share the inference ports (gRPC and HTTP) through SO_REUSEPORT, and
Linux lets any later socket of the same user with SO_REUSEPORT join that
group: a second gateway started on the port would silently take half of the
connections. So before anything binds, a plain bind (no SO_REUSEPORT) probes
the port; it fails whenever any socket at all holds it, reuseport or not. A
single serving process then binds without SO_REUSEPORT, and a supervisor
reserves the port with it for its own workers only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import itertools
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config.settings import GatewaySettings

# The flag that sets each port, and how to get a free one, for the message.
_FLAGS = {
    "port": ("port", "--port", "0 picks a free one"),
    "http_port": ("HTTP port", "--http-port", "0 picks a free one, -1 turns the REST binding off"),
    "control_port": ("control port", "--control-port", "0 picks a free one, -1 turns the control API off"),
    "metrics_port": ("metrics port", "--metrics-port", "0 picks a free one, -1 turns metrics off"),
    "dashboard_port": ("dashboard port", "--dashboard-port", "0 picks a free one, -1 turns the dashboard off"),
}


def _sockaddr(host: str, port: int, setting: str) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{setting}: cannot listen on {host}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def in_use_message(setting: str, port: int) -> str:
    label, flag, free = _FLAGS.get(setting, (setting, f"--{setting.replace('_', '-')}", "0 picks a free one"))
    return f"{label} {port} is in use (another gateway?): stop it, or choose another with {flag} ({free})"


def bind_failure(host: str, port: int, setting: str, exc: OSError) -> ConfigError:
    """The one-line refusal for a bind that failed: whose port, and how to choose another."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(in_use_message(setting, port))
    return ConfigError(f"{setting}: cannot listen on {host}:{port}: {exc.strerror}")


def check_free(host: str, port: int, setting: str) -> None:
    """Refuse, naming the setting and the fix, when any socket holds host:port (port 0 is always free)."""
    if port <= 0:
        return
    family, sockaddr = _sockaddr(host, port, setting)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Connections of an earlier run still in TIME_WAIT are nobody's port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise bind_failure(host, port, setting, exc) from None


def _overlaps(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Whether two listening addresses can clash: the same address, or either one every address."""
    if a[0] == b[0]:
        return True
    return any(ipaddress.ip_address(str(addr[0]).split("%")[0]).is_unspecified for addr in (a, b))


def check_distinct(s: GatewaySettings) -> None:
    """Refuse one port number given to two of the gateway's listeners on overlapping addresses.

    Otherwise every model loads first, and then the second listener fails to bind
    with grpc's own error lines (or, under a supervisor, after its workers serve).
    0 (a free one each) and -1 (off) are never a clash.
    """
    listeners = [(setting, host, port) for setting, host, port in (
        ("port", s.host, s.port),
        ("http_port", s.host, s.http_port),
        ("control_port", s.control_host, s.control_port),
        ("metrics_port", s.host, s.metrics_port),
        ("dashboard_port", s.control_host, s.dashboard_port),
    ) if port > 0]  # fmt: skip
    for (first, host_a, port_a), (second, host_b, port_b) in itertools.combinations(listeners, 2):
        if port_a == port_b and _overlaps(_sockaddr(host_a, port_a, first)[1], _sockaddr(host_b, port_b, second)[1]):
            flag_a, flag_b = _FLAGS[first][1], _FLAGS[second][1]
            raise ConfigError(
                f"port {port_a} is given to both {flag_a} and {flag_b}: give each its own ({_FLAGS[second][2]})"
            )


def check_ports(s: GatewaySettings, inference: bool = True) -> None:
    """Refuse at once, before any model loads, a port given twice or one something else holds, naming its flag."""
    check_distinct(s)
    if inference:
        check_free(s.host, s.port, "port")
        check_free(s.host, s.http_port, "http_port")
    check_free(s.control_host, s.control_port, "control_port")
    check_free(s.host, s.metrics_port, "metrics_port")
    check_free(s.control_host, s.dashboard_port, "dashboard_port")


@contextlib.contextmanager
def startup_lock(port: int) -> Iterator[None]:
    """One gateway at a time between probing a port and reserving it with SO_REUSEPORT.

    Without it two supervisors started together could both probe a free port,
    then both join one SO_REUSEPORT group. Keyed by user and port: only sockets
    of the same user can join a group. Where the lock file cannot be opened the
    probe alone still refuses every gateway started before this one.
    """
    path = Path(tempfile.gettempdir()) / f"gateway-{os.getuid()}-port-{port}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def reserve_shared(host: str, port: int, setting: str = "port") -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT, after a probe: the port is ours and our workers'.

    Port 0 becomes one concrete port every worker can share; the kernel never
    picks a port another SO_REUSEPORT group holds.
    """
    family, sockaddr = _sockaddr(host, port, setting)
    with startup_lock(port) if port > 0 else contextlib.nullcontext():
        check_free(host, port, setting)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise bind_failure(host, port, setting, exc) from None
    return sock


def bind_listener(host: str, port: int, setting: str, *, shared: bool) -> socket.socket:
    """A socket bound to host:port for a server to listen on (the REST binding's).

    `shared` (a supervisor's worker): SO_REUSEPORT, joining the group the supervisor
    reserved. Otherwise bound alone, so a port another process holds is refused.
    """
    family, sockaddr = _sockaddr(host, port, setting)
    # IPPROTO_TCP said out loud: asyncio sets TCP_NODELAY only on connections whose socket
    # names it, and without it every response written in two parts (headers, then body)
    # waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # Connections of an earlier run still in TIME_WAIT are nobody's port; on Linux
        # SO_REUSEADDR never lets a second socket bind a port someone listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise bind_failure(host, port, setting, exc) from None
    return sock
