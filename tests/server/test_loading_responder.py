"""The loading responder in-process: its connection cap, deadlines and last answers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from packager_server.connections import LoadingResponder


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


def _connect(listener: socket.socket) -> socket.socket:
    return socket.create_connection(listener.getsockname(), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _get(listener: socket.socket, path: str) -> bytes:
    with _connect(listener) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return _read_all(sock)


def test_a_full_house_drops_its_oldest_connection_for_a_probe(listener: socket.socket) -> None:
    responder = LoadingResponder(listener, header_timeout=60, max_connections=3)
    responder.start()
    try:
        idle = [_connect(listener) for _ in range(3)]
        assert _get(listener, "/live").startswith(b"HTTP/1.1 200 OK")
        assert idle[0].recv(1) == b""  # the oldest was closed to make room
        ready = _get(listener, "/ready?verbose=1")
        assert ready.startswith(b"HTTP/1.1 503")
        assert json.loads(ready.partition(b"\r\n\r\n")[2])["error_code"] == (
            "TEMPORARILY_UNAVAILABLE"
        )
        for sock in idle:
            sock.close()
    finally:
        responder.stop()


def test_heads_have_a_deadline_and_bodies_do_not_reset_the_answer(
    listener: socket.socket,
) -> None:
    responder = LoadingResponder(listener, header_timeout=0.5)
    responder.start()
    try:
        with _connect(listener) as slow, _connect(listener) as silent:
            slow.sendall(b"GET /live HTTP/1.1\r\n")
            started = time.monotonic()
            timed_out = _read_all(slow)
            assert timed_out.startswith(b"HTTP/1.1 408"), timed_out
            assert time.monotonic() - started < 5
            assert _read_all(silent) == b""  # nothing sent: closed without a word
        with _connect(listener) as post:  # a body the responder never reads as a request
            body = b'{"inputs": [1]}' * 1000
            post.sendall(
                b"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            assert _read_all(post).startswith(b"HTTP/1.1 503")
    finally:
        responder.stop()


def test_stopping_tells_an_unfinished_request_to_retry(listener: socket.socket) -> None:
    responder = LoadingResponder(listener, header_timeout=60)
    responder.start()
    with _connect(listener) as partial:
        partial.sendall(b"GET /ready HTTP/1.1\r\n")
        assert _get(listener, "/livez").startswith(b"HTTP/1.1 200")  # ours was read too
        responder.stop()
        answer = _read_all(partial)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"retry" in answer
    assert not responder.is_alive()
