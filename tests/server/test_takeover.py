"""A worker that cannot answer: the supervisor answers for it (packager_server.takeover).

In a real server: the prediction below holds the GIL in C for minutes (``hold_gil``:
OpenSSL's PBKDF2 through ``ctypes.PyDLL``), so no Python runs in its worker: neither
SIGALRM (inline predictions) nor the event loop's ``wait_for`` (predictions on the thread)
can answer its timeout. Its client must still get a 504 JSON, every other request that
worker accepted an answer (never a reset), and the worker a replacement that serves.

In process: what the supervisor writes for each state a connection can be in (never a byte
where a response has begun), and the worker's registrations surviving a full channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager_server.connections import _end_stream
from packager_server.supervisor import TAKEOVER_GRACE_SECONDS
from packager_server.takeover import ConnectionTable, Farewell, Lifeline, Takeover
from tests.server.conftest import ServerProcess, received_by_server, run_server, wait_until

ONE_ROW = {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}
TIMEOUT = 2.0
# The promise: an answer by --timeout + the grace. Slack on top: the supervisor looks ten
# times a second, and stops the worker before answering, on a machine the test loads.
ANSWERED_BY = TIMEOUT + TAKEOVER_GRACE_SECONDS + 1.0
OTHERS = 6  # kept-alive connections open before the stuck request


def _invocation(params: dict[str, Any], request_id: str = "") -> bytes:
    body = json.dumps({**ONE_ROW, "params": params}).encode()
    extra = f"X-Request-ID: {request_id}\r\n".encode() if request_id else b""
    return (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP/1.1 response (Content-Length framed); a reset or an early close
    fails the test, naming what arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)  # ConnectionResetError: a reset, the bug this guards
        assert chunk, f"connection closed without a complete answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed in the middle of an answer: {data!r}"
        body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=60)


def _kept_alive(server: ServerProcess, count: int) -> list[socket.socket]:
    """Connections a worker has accepted and answered once, now idle."""
    opened = []
    for _ in range(count):
        sock = _connect(server)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock)[0] == 200
        opened.append(sock)
    return opened


def _access_log(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.stdout().splitlines() if line.startswith("{")]


def _children(server: ServerProcess) -> set[int]:
    pid = server.process.pid
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _every_worker_predicts_on_its_thread(server: ServerProcess, workers: int) -> None:
    """Slow predictions until each worker has made one: a worker whose recent predictions
    are slow runs the next one on its thread (app.INLINE_BUDGET), not on its event loop.
    Two at a time: a worker predicting inline accepts no connection, the other one does."""
    deadline = time.monotonic() + 60
    while True:
        threads = [
            threading.Thread(target=server.invoke, args=({**ONE_ROW, "params": {"sleep": 0.5}},))
            for _ in range(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        slow = {
            entry["worker"]
            for entry in _access_log(server)
            if entry["path"] == "/invocations" and entry["duration_ms"] >= 500
        }
        if len(slow) == workers:
            return
        assert time.monotonic() < deadline, f"only workers {slow} predicted slowly"


def _a_replacement_serves(server: ServerProcess, row: int, after: float) -> None:
    """Predictions on new connections until the stuck worker's row answers one."""
    deadline = time.monotonic() + 90
    while not any(
        entry["worker"] == row and entry["status"] == 200 and entry["ts"] > after
        for entry in _access_log(server)
        if entry["path"] == "/invocations"
    ):
        assert time.monotonic() < deadline, "the stuck worker's replacement never served"
        answer = server.invoke(ONE_ROW, timeout=60)
        assert answer.status == 200, answer.body
        assert answer.json() == {"predictions": [3.0]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fork", "spawn"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("where", ["inline", "thread"])
def test_a_prediction_holding_the_gil_gets_its_504_and_the_worker_is_replaced(
    server_models: Path, tmp_path: Path, where: str, workers: int, mode: str
) -> None:
    with run_server(
        server_models / "sleepy",
        tmp_path,
        *("--workers", str(workers), "--timeout", str(TIMEOUT)),
        *("--serving-mode", mode, "--log-format", "json"),
    ) as server:
        if where == "thread":
            _every_worker_predicts_on_its_thread(server, workers)
        before = _children(server)
        others = _kept_alive(server, OTHERS)
        with _connect(server) as stuck:
            stuck.sendall(_invocation({"hold_gil": True}, request_id="stuck-request-1"))
            sent = time.monotonic()
            wait_until(lambda: received_by_server(server.port, stuck), 10, "a worker reads it")
            # Parsing and schema enforcement (Python, which lets other threads run) come
            # before the GIL is held: a ping sent at once could still be answered by the
            # worker's event loop (six 200s on a loaded machine). A second, half the
            # timeout, puts the pings after that.
            time.sleep(TIMEOUT / 2)
            # Meanwhile, a request on every other connection: those the stuck worker holds
            # cannot be read by it any more.
            for sock in others:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = _response(stuck)
            answered = time.monotonic() - sent
            answered_at = time.time()
        assert status == 504, body
        assert json.loads(body) == {
            "error_code": "DEADLINE_EXCEEDED",
            "message": f"the prediction took longer than {TIMEOUT:g} s; "
            "the worker is being replaced",
        }
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert headers["x-request-id"] == "stuck-request-1"
        assert TIMEOUT <= answered < ANSWERED_BY, answered

        # Every other connection gets an answer: 200 from a worker, or the supervisor's
        # 503 for the stuck worker's (with one worker, all of them).
        statuses = []
        for sock in others:
            status, _, body = _response(sock)
            statuses.append(status)
            if status == 503:
                assert json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE"
            else:
                assert (status, body) == (200, b"\n")
            sock.close()
        if workers == 1:
            assert statuses == [503] * OTHERS

        taken_over = re.compile(r"worker (\d+) \(pid (\d+)\) has been predicting for over")
        wait_until(lambda: taken_over.search(server.stderr()), 10, "the supervisor logs it")
        found = taken_over.search(server.stderr())
        assert found
        row, stuck_pid = int(found.group(1)), int(found.group(2))
        assert stuck_pid in before
        wait_until(
            lambda: len(_children(server)) == workers and stuck_pid not in _children(server),
            60,
            "a replacement worker starts",
        )
        _a_replacement_serves(server, row, after=answered_at)
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'path="/invocations",status="504"} 1' in metrics
        assert 'packager_worker_restarts_total{model="sleepy",version=""} 1' in metrics
    assert "was stuck in a prediction; starting a new one" in server.stderr()


@pytest.mark.slow
def test_a_retiring_worker_whose_abandoned_thread_takes_the_gil_is_replaced(
    server_models: Path, tmp_path: Path
) -> None:
    """On the thread, the worker answers its own 504 (the prediction sleeps, GIL released)
    and retires; then the abandoned thread holds the GIL, and the worker cannot exit (its
    hard-exit timer is Python). A request still arriving keeps its shutdown waiting: the
    supervisor answers it, and replaces the worker, without a second answer to the first."""
    with run_server(
        server_models / "sleepy",
        tmp_path,
        *("--workers", "1", "--timeout", str(TIMEOUT), "--log-format", "json"),
    ) as server:
        _every_worker_predicts_on_its_thread(server, 1)
        with _connect(server) as first, _connect(server) as second:
            first.sendall(_invocation({"sleep": TIMEOUT + 0.3, "hold_gil": True}))
            wait_until(lambda: received_by_server(server.port, first), 10, "the worker reads it")
            # A request whose body is still on its way: uvicorn waits for it on shutdown.
            head, _, body = _invocation({}).partition(b"\r\n\r\n")
            second.sendall(head + b"\r\n\r\n" + body[:5])
            status, _, answer = _response(first)
            assert status == 504
            assert json.loads(answer)["error_code"] == "DEADLINE_EXCEEDED"
            status, _, answer = _response(second)
            assert status == 503, answer
            assert json.loads(answer)["error_code"] == "TEMPORARILY_UNAVAILABLE"
            first.settimeout(10)
            assert first.recv(65536) == b""  # closed, and nothing written after the 504
        assert server.invoke(ONE_ROW, timeout=60).json() == {"predictions": [3.0]}
    assert "has been predicting for over" in server.stderr()


@pytest.fixture(params=["httptools-uvloop", "h11-asyncio"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The worker's HTTP parser and event loop (as in test_connections.py): the fast ones,
    or uvicorn's pure-Python fallbacks, whose pipelining works differently."""
    if request.param == "httptools-uvloop":
        return {}
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("httptools", "uvloop"):
        (hidden / f"{name}.py").write_text("raise ImportError('hidden by the test')\n")
    return {"PYTHONPATH": str(hidden)}


@pytest.mark.slow
def test_a_pipelined_request_gets_the_504_after_the_answer_before_it(
    server_models: Path, tmp_path: Path, stack: dict[str, str]
) -> None:
    """A probe and the stuck prediction in one write: the worker answers the probe, the
    supervisor the prediction, in order on the one connection."""
    with run_server(
        server_models / "sleepy",
        tmp_path / "logs",
        *("--workers", "1", "--timeout", str(TIMEOUT), "--serving-mode", "fork"),
        env=stack,
    ) as server:
        with _connect(server) as sock:
            sock.sendall(
                b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
                + _invocation({"hold_gil": True}, request_id="second")
            )
            assert _response(sock)[0::2] == (200, b"\n")
            status, headers, body = _response(sock)
            assert (status, headers["x-request-id"]) == (504, "second")
            assert json.loads(body)["error_code"] == "DEADLINE_EXCEEDED"
            assert sock.recv(1) == b""  # and the connection closes
        assert server.invoke(ONE_ROW).json() == {"predictions": [3.0]}


# -- in process: the decision table and the channel ---------------------------------------


@contextlib.contextmanager
def _tcp_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """(server end, client end) of loopback TCP connections."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pairs = []
        for _ in range(count):
            client = socket.create_connection(listener.getsockname(), timeout=10)
            server, _ = listener.accept()
            server.setblocking(False)  # as a worker's event loop has it
            pairs.append((server, client))
    try:
        yield pairs
    finally:
        for server, client in pairs:
            server.close()
            client.close()


def _registered(line: Lifeline, sock: socket.socket) -> int:
    slot = line.opened(sock.fileno())
    assert slot is not None
    return slot


def _everything(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_the_supervisor_answers_outstanding_requests_and_never_writes_over_a_response() -> None:
    table = ConnectionTable(1, capacity=16)
    counted: list[tuple[int, str, int, float]] = []
    logged: list[dict[str, Any]] = []
    takeover = Takeover(
        table, lambda *args: counted.append(args), lambda **fields: logged.append(fields)
    )
    channel = takeover.connect(0)
    line = Lifeline(channel, table, 0)
    now = time.monotonic()
    with _tcp_pairs(8) as pairs:
        slots = [_registered(line, server) for server, _ in pairs]
        idle, unread, begun, stuck, queued, reading, pipelined, gone = (
            (slot, server, client) for slot, (server, client) in zip(slots, pairs, strict=True)
        )
        # idle: answered once, nothing since (left as opened).
        # unread: a request the worker never read (its loop did not run again).
        unread[2].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        # begun: the worker started a response; a client request waits unread behind it.
        line.request(begun[0])
        line.writing(begun[0])
        begun[1].send(b"HTTP/1.1 200 OK\r\ncontent-length: 22\r\n\r\n")
        begun[2].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        # stuck: predicting for 10 s; queued: a prediction waiting behind it for 0.5 s.
        line.request(stuck[0])
        line.predicting(stuck[0], now - 10, "the-stuck-one")
        line.request(queued[0])
        line.predicting(queued[0], now - 0.5, "the-queued-one", "/v2/models/{name}/infer")
        # reading: a request whose body is still arriving.
        line.request(reading[0])
        # pipelined: a response complete, the next request already read.
        line.request(pipelined[0])
        line.writing(pipelined[0])
        pipelined[1].send(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n\n")
        line.settled(pipelined[0], outstanding=True)
        # gone: the worker closed it (the supervisor's copy goes with the message).
        line.closed(gone[0])
        takeover.pump(0)

        told = takeover.release(0, Farewell(timeout=2.0, retry="worker restarting; retry"))
        for server, _ in pairs:  # the worker is dead: its copies are closed
            server.close()
        answers = {name: _everything(conn[2]) for name, conn in {
            "idle": idle, "unread": unread, "begun": begun, "stuck": stuck,
            "queued": queued, "reading": reading, "pipelined": pipelined, "gone": gone,
        }.items()}  # fmt: skip
        takeover.finish(0)

    assert told == {504: 1, 503: 4}
    assert answers["idle"] == answers["gone"] == b""  # closed, as an idle timeout would
    assert answers["begun"] == b"HTTP/1.1 200 OK\r\ncontent-length: 22\r\n\r\n"  # untouched
    assert answers["pipelined"].startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n\n")
    for name in ("unread", "queued", "reading"):
        assert answers[name].startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), name
    assert answers["pipelined"].endswith(b'"message": "worker restarting; retry"}')
    assert answers["stuck"].startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"x-request-id: the-stuck-one\r\n" in answers["stuck"]
    assert b"x-request-id: the-queued-one\r\n" in answers["queued"]
    assert answers["stuck"].endswith(
        b'{"error_code": "DEADLINE_EXCEEDED", "message": "the prediction took longer than '
        b'2 s; the worker is being replaced"}'
    )
    assert sorted((row, path, status) for row, path, status, _ in counted) == [
        (0, "/invocations", 504),
        (0, "/v2/models/{name}/infer", 503),  # counted under its own route
        (0, "other", 503),
        (0, "other", 503),
        (0, "other", 503),
    ]
    assert {entry["request_id"] for entry in logged} >= {"the-stuck-one", "the-queued-one"}


def _ignore(*_: Any, **__: Any) -> None:
    pass


def test_a_dead_worker_s_prediction_gets_a_500_saying_how_it_died() -> None:
    table = ConnectionTable(1, capacity=4)
    takeover = Takeover(table, _ignore, _ignore)
    line = Lifeline(takeover.connect(0), table, 0)
    with _tcp_pairs(1) as [(server, client)]:
        slot = _registered(line, server)
        line.request(slot)
        line.predicting(slot, time.monotonic(), "abc")
        told = takeover.release(0, Farewell(timeout=None, died="was killed by SIGKILL"))
        server.close()
        answer = _everything(client)
        takeover.finish(0)
    assert told == {500: 1}
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"the worker predicting this request was killed by SIGKILL" in answer


def test_registrations_wait_in_the_worker_while_the_channel_is_full() -> None:
    """More connections than the channel holds, before the supervisor reads any: none is
    lost, in order, once it reads (the worker's event loop sends the rest)."""
    count = 400  # the channel holds ~280 registrations on Linux's default buffer size
    table = ConnectionTable(1, capacity=count)
    takeover = Takeover(table, _ignore, _ignore)
    line = Lifeline(takeover.connect(0), table, 0)

    async def burst(server: socket.socket) -> None:
        slots = [_registered(line, server) for _ in range(count)]
        assert slots == list(range(count))
        for slot in slots[::2]:
            line.closed(slot)  # queued behind the registrations, in order
        for _ in range(200):
            takeover.pump(0)
            await asyncio.sleep(0.005)  # the loop runs the channel's writer

    with _tcp_pairs(1) as [(server, _)]:
        asyncio.run(burst(server))
        for slot in range(1, count, 2):
            line.request(slot)
        told = takeover.release(0, Farewell(timeout=2.0))
        server.close()
        takeover.finish(0)
    # Every registration arrived, and every close after it: the 200 left open, each with a
    # request outstanding, are answered (on one socket: the first answer closes it).
    assert told == {503: count // 2}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_connection_the_worker_closes_ends_though_the_supervisor_holds_a_copy(
    loop: str,
) -> None:
    """The worker's close() alone sends no FIN while another copy of the socket is open;
    connections._end_stream sends it from connection_lost, with either event loop."""
    copies: list[int] = []

    class Answering(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport  # uvloop's is no asyncio.Transport subclass
            copies.append(os.dup(transport.get_extra_info("socket").fileno()))

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"answer")
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            _end_stream(self.transport)

    async def exchange() -> bytes:
        server = await asyncio.get_running_loop().create_server(Answering, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"question")
        try:
            return await asyncio.wait_for(reader.read(), 10)  # to EOF
        finally:
            writer.close()
            server.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        received = uvloop.run(exchange())
    else:
        received = asyncio.run(exchange())
    for fd in copies:
        os.close(fd)
    assert received == b"answer"
