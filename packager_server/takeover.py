"""The supervisor answers for a worker that cannot: one stuck in a prediction, or dead.

A worker answers its own timeouts while it runs Python (see :mod:`packager_server.app`).
It cannot when the prediction is stuck in C code that holds the GIL, or that never
returns to Python on the event loop's thread: then no signal handler, timer or event loop
of that process runs again. And a worker that dies (the OOM killer, a crash in a model's C
code) leaves its connections to the kernel, which resets them. Their clients were
accepted, so another process answers them: the supervisor, which holds a copy of each
connection.

* **A channel per worker**: an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair, inherited by
  forked and started workers alike. For each connection it accepts, the worker sends the
  supervisor a copy of the socket (``SCM_RIGHTS``) and its slot number, and the slot
  number again once the connection is gone: two messages per connection, none per request.
  The supervisor reads them at its own pace (20 times a second; they wait in the socket
  pair, and beyond its capacity in the worker), so that its work stays off the requests'
  path. While it holds a copy, a worker's ``close()`` would not end the connection: the
  worker shuts its side down itself (the client's FIN), and the supervisor's close
  follows at its next reading.
* **A record per slot in shared memory** (:class:`ConnectionTable`), which the worker keeps
  current with plain stores, no system call and no lock: whether a request is
  outstanding, whether a response is being written, when the connection's prediction
  started, and its request id.
* **The supervisor decides on a stopped worker.** Past ``--timeout`` + 1 s in a prediction
  (metrics.py's busy mark: the worker had that second to answer the 504 itself), it stops
  the worker (``SIGSTOP``, waiting until it has stopped), and reads the channel to its end
  and the records, which cannot change any more. If the prediction has ended meanwhile,
  the worker goes on (``SIGCONT``). Otherwise the supervisor kills it, and answers 504
  ``DEADLINE_EXCEEDED`` to every prediction older than ``--timeout``, and 503
  ``TEMPORARILY_UNAVAILABLE`` (retry) to every other request outstanding on the worker's
  connections (:meth:`Takeover.release`). A worker that died is answered for the same
  way, with 500 ``INTERNAL_ERROR`` for the predictions it died in (a retry could kill the
  next worker). Stopping the worker, rather than a lock or a compare-and-set between the
  two processes, keeps the worker's side free of system calls, and a killed worker can
  leave no lock held.
* **It writes only at a response boundary.** A connection whose response the worker had
  started (or that it was closing) is closed as it is: its client has part of an answer,
  and nothing can complete it. One with nothing outstanding (an idle kept-alive
  connection) is closed, as an idle timeout would. A request outstanding is one the worker
  received and had not begun answering, or bytes waiting unread in the socket.

Cost (benchmarks/takeover_bench.py, on the 2-core development machine): 2 µs per request
on a kept-alive connection (bookkeeping and stores), 8 µs per connection in the worker
(its two messages and its shutdown), and 7 µs in the supervisor, later, off the requests'
path. End to end (server_bench.py's load generator against the previous version), the
p50 latency did not change measurably, kept alive or with a connection per request. A
connection the worker closes with unread input is reset (as before) when the supervisor
lets go of it, up to 50 ms later. The supervisor raises its open-file limit to the hard
limit.

Limits: a worker holds at most ``CAPACITY`` connections the supervisor can answer for
(more are served, unprotected); a response the worker had handed to its event loop but
the kernel had not taken yet (a client reading slowly) is lost with the worker.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import mmap
import os
import selectors
import socket
import struct
import termios
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from packager_server.connections import http_response
from packager_server.metrics import PATHS

log = logging.getLogger(__name__)

# A slot's state; the worker writes it, the supervisor reads it once the worker is stopped.
FREE, IDLE, REQUEST, WRITING = 0.0, 1.0, 2.0, 3.0
CAPACITY = 8192  # connections per worker that the supervisor can answer for
# state, prediction start (time.monotonic, 0 when none), the prediction's route (its index
# in metrics.PATHS: /invocations, Vertex's predict route or V2's infer)
_CELLS = 3
_ID_BYTES = 128  # the request id (app.py's _MAX_REQUEST_ID), NUL-padded ASCII
_RECORD = _CELLS * 8 + _ID_BYTES
_MESSAGE = struct.Struct("=cI")  # b"o" (with the socket) or b"c", then the slot
_OPEN, _CLOSE = b"o", b"c"
# After answering, read and drop what the client still sends for this long before closing
# (as connections.py's responders do): closing with unread input resets the connection,
# and the client may then lose the answer.
_LINGER_SECONDS = 1.0
_ROUTES = {path: float(index) for index, path in enumerate(PATHS)}


def deadline_message(timeout: float) -> str:
    """The message of a 504, whichever process answers it."""
    return f"the prediction took longer than {timeout:g} s; the worker is being replaced"


class ConnectionTable:
    """The slot records of every worker row: written by the worker, read by the supervisor."""

    def __init__(self, rows: int, fd: int | None = None, capacity: int = CAPACITY) -> None:
        """``fd``: a ``memfd`` to map, for started workers; otherwise an anonymous block
        shared with forked children (as metrics.SharedMetrics). Untouched pages cost no
        memory: a worker initializes a record when it first uses the slot."""
        self.rows, self.capacity = rows, capacity
        size = rows * capacity * _RECORD
        if fd is None:
            self._buffer = mmap.mmap(-1, size)
        else:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)
        self.cells = memoryview(self._buffer).cast("d")
        self.raw = memoryview(self._buffer)

    @classmethod
    def in_memfd(cls, rows: int) -> tuple[ConnectionTable, int]:
        """A table that started processes can map: the table and the inheritable fd."""
        fd = os.memfd_create("packager-connections", 0)  # no MFD_CLOEXEC: workers inherit it
        return cls(rows, fd), fd

    def record(self, row: int, slot: int) -> int:
        return row * self.capacity + slot

    def state(self, record: int) -> float:
        return self.cells[record * _RECORD // 8]

    def predicting_since(self, record: int) -> float:
        return self.cells[record * _RECORD // 8 + 1]

    def route(self, record: int) -> str:
        """The ``path`` label of the record's prediction (``metrics.PATHS``)."""
        index = int(self.cells[record * _RECORD // 8 + 2])
        return PATHS[index] if 0 <= index < len(PATHS) else "/invocations"

    def request_id(self, record: int) -> str | None:
        start = record * _RECORD + _CELLS * 8
        value = bytes(self.raw[start : start + _ID_BYTES]).rstrip(b"\0")
        return value.decode("ascii", "replace") or None


class Lifeline:
    """A worker's side: registers its connections and keeps their records.

    Called from the worker's event loop only. Every method but :meth:`opened` and
    :meth:`closed` is a store or two into shared memory.
    """

    def __init__(self, channel: socket.socket, table: ConnectionTable, row: int) -> None:
        channel.setblocking(False)
        channel.set_inheritable(False)  # not for the model's own subprocesses
        self._channel = channel
        self._cells = table.cells
        self._raw = table.raw
        self._first = table.record(row, 0)
        self._capacity = table.capacity
        self._free: list[int] = []  # reused first: the table's touched pages stay few
        self._next = 0
        self._outbox: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._broken = False
        self._full_logged = False

    def opened(self, fd: int) -> int | None:
        """Register a connection's socket; its slot, or None (no room: unprotected)."""
        if self._broken:
            return None
        if self._free:
            slot = self._free.pop()
        elif self._next < self._capacity:
            slot, self._next = self._next, self._next + 1
        else:
            if not self._full_logged:
                self._full_logged = True
                log.warning(
                    "over %d connections on this worker: the supervisor cannot answer for "
                    "the others if the worker gets stuck or dies",
                    self._capacity,
                )
            return None
        cell = (self._first + slot) * _RECORD // 8
        self._cells[cell] = IDLE
        self._cells[cell + 1] = 0.0
        self._send(_MESSAGE.pack(_OPEN, slot), fd)
        return slot

    def closed(self, slot: int) -> None:
        self._cells[(self._first + slot) * _RECORD // 8] = FREE
        self._free.append(slot)
        self._send(_MESSAGE.pack(_CLOSE, slot), None)

    def request(self, slot: int) -> bool:
        """Bytes of a request arrived: it is outstanding, unless a response is being
        written (False: the caller remembers it for when that response is complete)."""
        cell = (self._first + slot) * _RECORD // 8
        if self._cells[cell] == WRITING:
            return False
        self._cells[cell] = REQUEST
        return True

    def writing(self, slot: int) -> None:
        """About to write a response (or to close): the supervisor must not write."""
        self._cells[(self._first + slot) * _RECORD // 8] = WRITING

    def settled(self, slot: int, *, outstanding: bool) -> None:
        """A response is complete: another request is outstanding, or none."""
        self._cells[(self._first + slot) * _RECORD // 8] = REQUEST if outstanding else IDLE

    def predicting(
        self, slot: int, since: float, request_id: str, route: str = "/invocations"
    ) -> None:
        """A prediction starts: uvicorn has completed every earlier response on this
        connection, and has not begun this request's. ``route``: its ``path`` label."""
        record = self._first + slot
        self._cells[record * _RECORD // 8] = REQUEST
        # The route before the start time: a worker stopped between the two stores is
        # never counted under the slot's previous route.
        self._cells[record * _RECORD // 8 + 2] = _ROUTES.get(route, _ROUTES["/invocations"])
        self._cells[record * _RECORD // 8 + 1] = since
        start = record * _RECORD + _CELLS * 8
        value = request_id.encode("ascii", "replace")[:_ID_BYTES]
        self._raw[start : start + _ID_BYTES] = value.ljust(_ID_BYTES, b"\0")

    def predicted(self, slot: int) -> None:
        self._cells[(self._first + slot) * _RECORD // 8 + 1] = 0.0

    def _send(self, message: bytes, fd: int | None) -> None:
        if not self._outbox and self._try_send(message, fd):
            return
        if self._broken:
            return
        # The supervisor is behind (it was busy, or a burst of connections came): keep
        # the message, with a copy of the socket that a close cannot recycle meanwhile.
        if not self._outbox:
            asyncio.get_running_loop().add_writer(self._channel, self._flush)
        self._outbox.append((message, None if fd is None else os.dup(fd)))

    def _flush(self) -> None:
        while self._outbox:
            message, fd = self._outbox[0]
            if not self._try_send(message, fd) and not self._broken:
                return  # still full: called again when there is room
            self._outbox.popleft()
            if fd is not None:
                os.close(fd)
        asyncio.get_running_loop().remove_writer(self._channel)

    def _try_send(self, message: bytes, fd: int | None) -> bool:
        try:
            if fd is None:
                self._channel.send(message)
            else:
                self._channel.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                )
        except BlockingIOError:
            return False
        except OSError:
            if not self._broken:
                log.warning("the supervisor's channel is gone; serving unprotected")
            self._broken = True
            return False
        return True


@dataclass
class _Worker:
    channel: socket.socket
    sockets: dict[int, int] = field(default_factory=dict)  # slot -> the supervisor's copy
    ended: bool = False  # the channel's end was read: the worker is gone


@dataclass(frozen=True, kw_only=True)
class Farewell:
    """What :meth:`Takeover.release` tells a worker's outstanding requests."""

    timeout: float | None  # stuck: predictions older than this get 504, younger ones 503
    died: str = ""  # dead (timeout None): its predictions get 500, saying how it died
    retry: str = "worker restarting; retry"  # the 503's message


class Takeover:
    """The supervisor's side: the channels, the copies of the workers' connections, and
    the answers it writes for them. Runs in the supervisor's main thread."""

    def __init__(
        self,
        table: ConnectionTable,
        observe: Callable[[int, str, int, float], None],
        access: Callable[..., None],
    ) -> None:
        """``observe(row, path, status, seconds)`` counts an answer in the metrics;
        ``access(**fields)`` writes its access log line."""
        self.table = table
        self._observe, self._access = observe, access
        self._selector = selectors.DefaultSelector()  # the lingering sockets
        self._workers: dict[int, _Worker] = {}  # by row
        self._lingering: dict[socket.socket, float] = {}  # answered: deadline to close
        self._lost_logged = False

    def connect(self, row: int) -> socket.socket:
        """A new channel for the row's next worker: returns the worker's end (close it
        once the worker has it)."""
        self.drop(row)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._workers[row] = _Worker(ours)
        return theirs

    def pump(self, timeout: float) -> None:
        """Serve the lingering sockets for ``timeout``, then read every channel."""
        for key, _ in self._selector.select(timeout):
            self._linger(key.fileobj)  # type: ignore[arg-type]
        for row in list(self._workers):
            self._read(row)
        now = time.monotonic()
        for sock in [s for s, deadline in self._lingering.items() if deadline <= now]:
            self._close(sock)

    def release(self, row: int, farewell: Farewell) -> collections.Counter[int]:
        """Answer what a stopped or dead worker leaves outstanding, and let go of its
        connections and channel; returns how many answers, by status.

        Only once the worker can no longer run: stopped (``SIGSTOP``), killed, or dead.
        Its records and its channel's last messages are final then.
        """
        self._read(row)
        told: collections.Counter[int] = collections.Counter()
        worker = self._workers.get(row)
        if worker is None:
            return told
        now = time.monotonic()
        for slot, fd in worker.sockets.items():
            record = self.table.record(row, slot)
            state = self.table.state(record)
            unread = _unread(fd)
            if not (state == REQUEST or (state == IDLE and unread)):
                # A response begun, or nothing outstanding: closed without a word (after
                # what the worker wrote, and without a reset if input waits).
                if unread:
                    self._close_later(fd)
                else:
                    os.close(fd)
                continue
            since = self.table.predicting_since(record) if state == REQUEST else 0.0
            status, code, message = _farewell_answer(farewell, since, now)
            request_id = (self.table.request_id(record) if since else None) or uuid.uuid4().hex
            body = json.dumps({"error_code": code, "message": message}).encode()
            phrase = f"{status} {HTTPStatus(status).phrase}"
            client = self._answer(fd, http_response(phrase, body, request_id=request_id))
            told[status] += 1
            path, seconds = (self.table.route(record), now - since) if since else ("other", 0.0)
            self._observe(row, path, status, seconds)
            self._access(
                client=client,
                method="POST" if since else "-",
                path=path if since else "-",
                status=status,
                seconds=seconds,
                size=len(body),
                request_id=request_id,
                worker=row,
            )
        worker.sockets.clear()
        self.drop(row)
        return told

    def finish(self, seconds: float) -> None:
        """Let the answered connections linger up to ``seconds``, then close them."""
        deadline = time.monotonic() + seconds
        while self._lingering and time.monotonic() < deadline:
            self.pump(0.05)
        for sock in list(self._lingering):
            self._close(sock)

    def forget(self) -> None:
        """In a forked worker: close every descriptor the supervisor holds. (A copy of a
        connection left open in another process would keep it open after its own worker
        closed it.)"""
        for worker in self._workers.values():
            for fd in worker.sockets.values():
                os.close(fd)
            worker.channel.close()
        for sock in self._lingering:
            sock.close()
        self._selector.close()
        self._workers.clear()
        self._lingering.clear()

    def drop(self, row: int) -> None:
        """Close a worker's channel and the copies of its connections, unanswered."""
        worker = self._workers.pop(row, None)
        if worker is None:
            return
        for fd in worker.sockets.values():
            os.close(fd)
        worker.channel.close()

    def _read(self, row: int) -> None:
        worker = self._workers.get(row)
        if worker is None or worker.ended:
            return
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    worker.channel, _MESSAGE.size, 1, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data:  # the worker is gone, and its last message read
                worker.ended = True
                return
            kind, slot = _MESSAGE.unpack(data)
            old = worker.sockets.pop(slot, None)
            if old is not None:
                os.close(old)
            if kind != _OPEN:
                continue
            if fds:
                worker.sockets[slot] = fds[0]
            elif not self._lost_logged:  # MSG_CTRUNC: out of descriptors here
                self._lost_logged = True
                log.warning(
                    "the supervisor is out of file descriptors (flags %#x): it cannot "
                    "answer for some connections if their worker gets stuck or dies",
                    flags,
                )

    def _answer(self, fd: int, response: bytes) -> str:
        """Write a whole response, then close; returns the client's address."""
        sock = self._close_later(fd, response)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        return str(peer[0]) if isinstance(peer, tuple) else "-"

    def _close_later(self, fd: int, response: bytes = b"") -> socket.socket:
        """Send ``response``, end the stream, and read what the client still sends until
        it closes or a second has passed: closing with unread input would reset the
        connection, and a reset can discard what the client had not read yet."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)  # shared with the worker's copy, which no longer runs
        with contextlib.suppress(OSError):
            if response:
                sock.send(response)  # small, on a connection at a response boundary: room
            sock.shutdown(socket.SHUT_WR)
        self._lingering[sock] = time.monotonic() + _LINGER_SECONDS
        self._selector.register(sock, selectors.EVENT_READ)
        return sock

    def _linger(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)  # the client has closed its side

    def _close(self, sock: socket.socket) -> None:
        del self._lingering[sock]
        self._selector.unregister(sock)
        sock.close()


def _farewell_answer(farewell: Farewell, since: float, now: float) -> tuple[int, str, str]:
    """(status, error code, message) for a request outstanding; ``since``: when its
    prediction started (0: not predicting)."""
    if since and farewell.timeout is None:
        message = f"the worker predicting this request {farewell.died}; it is being replaced"
        return 500, "INTERNAL_ERROR", message
    if since and farewell.timeout is not None and now - since >= farewell.timeout:
        return 504, "DEADLINE_EXCEEDED", deadline_message(farewell.timeout)
    return 503, "TEMPORARILY_UNAVAILABLE", farewell.retry


def _unread(fd: int) -> bool:
    """Bytes the worker never read: a request sent to it."""
    try:
        buffer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return bool(struct.unpack("i", buffer)[0])
