"""Clients that hold connections: idle, slow or queued sockets, while loading and at exit.

Each test opens many raw sockets to a real server process and checks what every one of
them gets back: probes must not starve behind idle sockets, slow request heads must be cut
off, and a request the server accepted must be answered, also when its worker retires or
the server is told to stop.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, run_server

pytestmark = pytest.mark.slow

ONE_ROW = {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}


def _connect(server: ServerProcess, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset is returned as ``b"reset"``."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return b"reset"
    return received


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def _body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def _invocation(params: dict[str, object]) -> bytes:
    body = json.dumps({**ONE_ROW, "params": params}).encode()
    return (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _probe(server: ServerProcess, path: str) -> tuple[int, float]:
    """One GET on a new connection: the status and the seconds to the complete answer."""
    started = time.perf_counter()
    with _connect(server, timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = _read_all(sock)
    return _status(response), time.perf_counter() - started


@contextlib.contextmanager
def _sockets(count: int, server: ServerProcess) -> Iterator[list[socket.socket]]:
    opened = [_connect(server) for _ in range(count)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _received_by_server(port: int, client: socket.socket) -> bool:
    """True once the server process has read everything ``client`` sent (Linux).

    The kernel lists every TCP socket in /proc/net/tcp with the bytes waiting in its
    receive queue: the server's end of this connection has an empty queue once the worker
    read the request from it.
    """
    client_port = client.getsockname()[1]
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16) == 0
    return False


def _wait(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {seconds:g}s"
        time.sleep(0.02)


# -- item 6: probes while the model loads ------------------------------------------------


def test_probes_answer_at_once_while_loading_despite_idle_and_slow_connections(
    server_models: Path, tmp_path: Path
) -> None:
    # The load lasts longer than the test; the header timeout too, so that every socket
    # below stays open while the probes run.
    env = {"SLEEPY_LOAD_SECONDS": "120", "PACKAGER_HEADER_TIMEOUT": "120"}
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", env=env, wait_ready=False
    ) as server:
        deadline = time.monotonic() + 60
        while True:  # the loading responder listens
            with contextlib.suppress(OSError):
                if _probe(server, "/live")[0] == 200:
                    break
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.1)
        stop = threading.Event()
        with _sockets(100, server) as _idle, _sockets(100, server) as slow:
            for sock in slow:
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n")

            def trickle() -> None:  # one more header line on each slow socket, forever
                while not stop.wait(0.2):
                    for sock in slow:
                        with contextlib.suppress(OSError):
                            sock.send(b"X-Slow: 1\r\n")

            trickler = threading.Thread(target=trickle)
            trickler.start()
            try:
                for _ in range(10):
                    live, live_seconds = _probe(server, "/live")
                    ready, ready_seconds = _probe(server, "/ready")
                    assert (live, ready) == (200, 503)
                    assert live_seconds < 0.1, live_seconds
                    assert ready_seconds < 0.1, ready_seconds
            finally:
                stop.set()
                trickler.join(timeout=10)
        assert server.process.poll() is None
