"""Connections below the ASGI app: who holds a socket, for how long, and what it is told.

Two places accept connections on the one listening socket:

* before workers exist, the supervisor's :class:`LoadingResponder` answers probes while
  the model loads (``/live``: 200, anything else: 503);
* then each worker's uvicorn, with :class:`GuardedConnection` in its protocol classes and
  :class:`packager_server.app.DrainingServer` (this module imports no uvicorn: the
  supervisor imports it before binding, and answers probes sooner without it).

Both follow the same rules, so that neither slow clients nor a shutdown can cost a
request its answer:

* **A request head has a deadline** (``--header-timeout``): from a connection's opening,
  or from the first byte of the next request on a kept-alive one. A client that misses
  it gets 408 (if it sent anything) and is disconnected: idle or trickling sockets
  (slowloris) cannot hold a worker's connections, nor starve the probes while loading.
* **An accepted request is answered.** Stopping (SIGTERM, or a worker retiring after a
  timeout) closes idle kept-alive connections at once, as uvicorn does; but a connection
  still waiting for its request head is given a moment for it (uvicorn closes it, and
  the kernel then resets a request already on its way), and on SIGTERM a worker first
  accepts what waits in the shared listen backlog (the last process to close the socket
  makes the kernel reset all of it). And a worker that can no longer answer (stuck in C
  code, or dead) is answered for by the supervisor: each connection is registered with it,
  and kept described, through :class:`packager_server.takeover.Lifeline`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import selectors
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# Most connections the loading responder holds at once; beyond, the oldest is dropped.
MAX_LOADING_CONNECTIONS = 1000
_MAX_HEAD = 16 * 1024
# After answering, read and drop what the client still sends (a POST's body) for this
# long before closing: closing with unread input makes the kernel reset the connection,
# and the client may then lose the answer.
_LINGER_SECONDS = 1.0
# On shutdown, how long a connection still waiting for its request head is given: a
# request sent before the signal is on its way, and arrives within a round trip.
DRAIN_HEAD_SECONDS = 1.0
_RECHECK_SECONDS = 0.05
# Where a request's scope["state"] carries its connection's takeover slot.
SLOT_KEY = "packager.slot"


def http_response(
    status: str, body: bytes, *, head_only: bool = False, request_id: str | None = None
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a JSON body."""
    head = [
        f"HTTP/1.1 {status}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if request_id is not None:
        head.append(f"x-request-id: {request_id}")
    return "\r\n".join([*head, "", ""]).encode("latin-1") + (b"" if head_only else body)


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


def timeout_response(header_timeout: float) -> bytes:
    message = f"the request line and headers did not arrive within {header_timeout:g} s"
    return http_response("408 Request Timeout", _error("BAD_REQUEST", message))


_LOADING = _error("TEMPORARILY_UNAVAILABLE", "the model is loading")
_STARTING = _error("TEMPORARILY_UNAVAILABLE", "the server is starting; retry")
_STOPPING = _error("TEMPORARILY_UNAVAILABLE", "the server is stopping")


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    deadline: float  # for the request head; once answered, for the linger
    head: bytearray = field(default_factory=bytearray)
    answered: bool = False


class LoadingResponder(threading.Thread):
    """Answers probes on the listening socket until the model is loaded.

    One thread and one selector over non-blocking sockets: it accepts every waiting
    connection, reads each one's request head as it arrives, and answers it as soon as
    it is complete, so a probe is answered at once however many other connections are
    open, idle or slow. ``/live`` and ``/livez`` get 200, anything else 503 (not ready).
    """

    _LIVE = (b"/live", b"/livez", b"/v2/health/live")

    def __init__(
        self,
        sock: socket.socket,
        *,
        header_timeout: float,
        max_connections: int = MAX_LOADING_CONNECTIONS,
    ) -> None:
        super().__init__(name="loading-responder", daemon=True)
        self.sock = sock
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._stop_event = threading.Event()
        self._last_word = _STARTING
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._clients: dict[socket.socket, _Client] = {}  # in order of arrival
        self._selector = selectors.DefaultSelector()

    def run(self) -> None:
        selector = self._selector
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(self._wake_reader, selectors.EVENT_READ)
        try:
            while not self._stop_event.is_set():
                for key, _ in selector.select(timeout=self._next_deadline()):
                    if key.fileobj is self.sock:
                        self._accept()
                    elif client := self._clients.get(key.fileobj):  # type: ignore[call-overload]
                        self._read(client)
                self._expire()
        finally:
            for client in list(self._clients.values()):
                # The model is loaded (or the server stops): an unfinished request is told
                # so; a retry goes to a worker.
                if client.head and not client.answered:
                    self._send(client, http_response("503 Service Unavailable", self._last_word))
                self._close(client)
            selector.close()

    def stop(self, *, shutting_down: bool = False) -> None:
        """Stop answering; connections still open are closed (503 if they sent a part)."""
        if shutting_down:
            self._last_word = _STOPPING
        self._stop_event.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        self.join()
        self._wake_reader.close()
        self._wake_writer.close()
        self.sock.setblocking(True)

    def _next_deadline(self) -> float:
        if not self._clients:
            return 1.0
        soonest = min(client.deadline for client in self._clients.values())
        return max(0.0, min(1.0, soonest - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors, say: make room and retry later
                if self._clients:
                    self._close(next(iter(self._clients.values())))
                return
            if len(self._clients) >= self.max_connections:
                self._close(next(iter(self._clients.values())))
            conn.setblocking(False)
            client = _Client(conn, time.monotonic() + self.header_timeout)
            self._clients[conn] = client
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)
        elif not client.answered:
            client.head += data
            if b"\r\n\r\n" in client.head or b"\n\n" in client.head:
                self._answer(client)
            elif len(client.head) > _MAX_HEAD:
                self._answer(client)  # from its request line; the rest is dropped

    def _answer(self, client: _Client) -> None:
        request_line = bytes(client.head.split(b"\n", 1)[0])
        parts = request_line.split(b" ")
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        head_only = parts[0] == b"HEAD"
        if path in self._LIVE:
            response = http_response("200 OK", b'{"status": "loading"}', head_only=head_only)
        else:
            response = http_response("503 Service Unavailable", _LOADING, head_only=head_only)
        self._send(client, response)
        client.answered = True
        client.deadline = time.monotonic() + _LINGER_SECONDS
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)

    def _expire(self) -> None:
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            if client.head and not client.answered:
                self._send(client, timeout_response(self.header_timeout))
            self._close(client)

    def _send(self, client: _Client, response: bytes) -> None:
        # A fresh connection's send buffer is empty: a small answer goes out whole.
        with contextlib.suppress(OSError):
            client.sock.send(response)

    def _close(self, client: _Client) -> None:
        del self._clients[client.sock]
        self._selector.unregister(client.sock)
        client.sock.close()


# -- in the workers: uvicorn's protocols, with the same rules -----------------------------

if TYPE_CHECKING:
    import asyncio

    from packager_server.takeover import Lifeline

    class _UvicornHttp(asyncio.Protocol):
        """What the mixin uses of uvicorn's HTTP protocols (httptools and h11 alike)."""

        transport: asyncio.Transport
        loop: asyncio.AbstractEventLoop
        cycle: Any  # the request in progress or last answered; None before the first
        app_state: dict[str, Any]  # copied into each request's scope["state"]

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def shutdown(self) -> None: ...
        def on_response_complete(self) -> None: ...

else:
    _UvicornHttp = object


class GuardedConnection(_UvicornHttp):
    """A header timeout, and a shutdown that answers accepted requests.

    A mixin for uvicorn's HTTP protocol classes (put it first among the bases). uvicorn
    has no header timeout: a connection that never completes a request head is held
    until the client leaves. And its shutdown closes every connection without a request
    in progress, including those whose request is already in the socket, unread (the
    event loop was busy, or the connection was only just accepted): closing a socket with
    unread input makes the kernel answer with a reset.

    With a ``lifeline``, it also registers the connection with the supervisor and keeps
    its record current: a request outstanding from its first byte, a response being
    written (the app marks it before writing, this class for its own 408 and the 400s),
    and after each response whether another request is outstanding (pipelined, or bytes
    that arrived meanwhile). Closing, it sends the FIN itself: the supervisor's copy of
    the socket would hold it back.
    """

    def __init__(
        self, *args: Any, header_timeout: float, lifeline: Lifeline | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # part of the awaited head has arrived
        self._rechecked = False
        self._draining = False
        self._lifeline = lifeline
        self.slot: int | None = None  # the connection's record, when registered
        self._more = False  # bytes arrived while a response was being written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._lifeline is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.slot = self._lifeline.opened(sock.fileno())
            if self.slot is not None:
                self.app_state = {**self.app_state, SLOT_KEY: self.slot}
        self._await_head(self.header_timeout)

    def data_received(self, data: bytes) -> None:
        line, slot = self._lifeline, self.slot
        if line is not None and slot is not None and not line.request(slot):
            self._more = True
        if not self._in_request():
            self._head_started = True
            if self._head_timer is None:  # the next request on a kept-alive connection
                self._await_head(self.header_timeout)
        super().data_received(data)
        if self._in_request() and self._head_timer is not None:
            self._head_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        if self._lifeline is not None and self.slot is not None:
            _end_stream(self.transport)  # the supervisor's copy keeps it open otherwise
            self._lifeline.closed(self.slot)
            self.slot = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request
        if self._lifeline is None or self.slot is None or self.transport.is_closing():
            return  # closing: the record stays "writing"
        self._lifeline.settled(self.slot, outstanding=self._more or self._in_request())
        self._more = False

    def writing(self) -> None:
        """A response is about to be written outside the app (a 408, a 400)."""
        if self._lifeline is not None and self.slot is not None:
            self._lifeline.writing(self.slot)

    def shutdown(self) -> None:
        """Called by uvicorn's shutdown (SIGTERM, or the worker retiring)."""
        waiting = self._head_timer is not None or _has_unread_input(self.transport)
        if self._in_request() or not waiting:
            # A request in progress is finished, then the connection closes; an idle
            # kept-alive connection closes now (uvicorn's own behaviour).
            super().shutdown()
            return
        # A request head is awaited, perhaps already on its way: give it a moment, then
        # answer it and close.
        self._draining = True
        remaining = self.header_timeout
        if self._head_timer is not None:
            remaining = self._head_timer.when() - self.loop.time()
        self._await_head(min(remaining, DRAIN_HEAD_SECONDS))

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_head(self, seconds: float) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

    def _head_received(self) -> None:
        self._cancel_head_timer()
        self._head_started = self._rechecked = False
        if self._draining:
            self.cycle.keep_alive = False  # answer this request, then close

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_request() or self.transport.is_closing():
            return
        if not self._rechecked and _has_unread_input(self.transport):
            # Input the event loop has not read yet (it was busy: uvloop runs due timers
            # before it polls sockets). Read it before judging the client.
            self._rechecked = True
            self._await_head(_RECHECK_SECONDS)
            return
        self.writing()
        if self._head_started:
            self.transport.write(timeout_response(self.header_timeout))
        self.transport.close()


def _end_stream(transport: asyncio.BaseTransport) -> None:
    """Send the FIN that closing the socket would send, were it the last copy.

    Called from ``connection_lost``: uvloop and asyncio close the socket right after it,
    so the descriptor is still this connection's. uvloop's transport socket refuses
    ``shutdown()``: a socket object is made on the descriptor, and detached from it.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return
    ours = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
    try:
        ours.shutdown(socket.SHUT_WR)
    except OSError:  # already reset, or never connected
        pass
    finally:
        ours.detach()


def _has_unread_input(transport: asyncio.BaseTransport) -> bool:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        buffer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return bool(struct.unpack("i", buffer)[0])
