"""The HTTP receiver: ``POST /webhook/mlflow``, ``/livez``, ``/readyz``, ``/metrics``.

The request path does only cheap, bounded work: read at most ``max_body`` bytes, check
the signature (:mod:`.signature`), parse the event, plan its jobs (:mod:`.rules`) and
commit them (:mod:`.queue`); the build runs on the worker pool. Answers:

- 200 ``queued`` / ``duplicate`` / ``ignored``: the event is safe (or needs nothing);
- 401 for an unsigned, forged or stale delivery, logged with its id and reason, never its
  body (the body is unauthenticated input and may be large or hostile);
- 400 for a body that is not an MLflow event, 413 above the size limit, 411 without a
  length, 404/405 elsewhere;
- 503 when the queue cannot commit: MLflow retries 5xx with the same delivery id, which
  the queue then accepts once.

Standard library ``http.server`` with one thread per connection: MLflow sends from a pool
of at most ten threads (``MLFLOW_WEBHOOK_DELIVERY_MAX_WORKERS``), so this is enough, and
it keeps the receiver's requests away from any event loop the release might use.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from packager.webhook import signature
from packager.webhook.queue import JobQueue
from packager.webhook.rules import BadEvent, Rules, parse_event
from packager.webhook.worker import WorkerPool

log = logging.getLogger(__name__)

PATH = "/webhook/mlflow"
MAX_BODY = 1 << 20  # MLflow's payloads are a few hundred bytes; tags and descriptions grow
# Connections served at once; more are answered 503 and closed. MLflow sends from at most
# ten threads, and probes and scrapes add a few.
MAX_CONNECTIONS = 64
REQUEST_SECONDS = 30.0  # a request's body must arrive within this, however it trickles


@dataclass(frozen=True, kw_only=True)
class Answer:
    status: int
    body: dict[str, object]


@dataclass(kw_only=True)
class Receiver:
    """What a request needs; one per server."""

    secret: str
    rules: Rules
    queue: JobQueue
    pool: WorkerPool
    max_body: int = MAX_BODY
    clock: Callable[[], float] | None = None  # tests pin the time; None: time.time
    # Other threads the receiver needs (the reconciler's): each says whether it still runs.
    background: list[Callable[[], bool]] = field(default_factory=list)

    def refuse_unsigned(self, headers: dict[str, str], peer: str) -> Answer | None:
        """The 401 for a request whose signature headers are missing or malformed,
        answered before its body is read; None when they look right."""
        try:
            signature.check_headers(headers)
        except signature.InvalidDelivery as err:
            return self._refused(headers, peer, err)
        return None

    def handle_delivery(self, headers: dict[str, str], body: bytes, peer: str) -> Answer:
        now = self.clock() if self.clock else None
        try:
            delivery = signature.verify(headers, body, self.secret, now=now)
        except signature.InvalidDelivery as err:
            return self._refused(headers, peer, err)
        try:
            event = parse_event(json.loads(body))
        except (ValueError, BadEvent) as err:
            return Answer(status=400, body={"error": f"not an MLflow event: {err}"})
        jobs = self.rules.plan(event) if event is not None else ()
        kind = event.kind if event is not None else "unsupported"
        try:
            accepted = self.queue.accept(delivery.delivery_id, kind, jobs)
        except Exception:
            log.exception("delivery %s could not be queued", delivery.delivery_id)
            return Answer(status=503, body={"error": "the queue is unavailable; retry"})
        if accepted.duplicate:
            status = "duplicate"
        elif accepted.job_ids:
            status = "queued"
            self.pool.wake()
        else:
            status = "ignored"
        log.info(
            "delivery %s (%s): %s %s", delivery.delivery_id, kind, status, list(accepted.job_ids)
        )
        return Answer(status=200, body={"status": status, "jobs": list(accepted.job_ids)})

    @staticmethod
    def _refused(headers: dict[str, str], peer: str, err: signature.InvalidDelivery) -> Answer:
        shown = headers.get(signature.DELIVERY_ID_HEADER.lower(), "-")[:64]
        log.warning("refused delivery %r from %s: %s", shown, peer, err.reason)
        return Answer(status=401, body={"error": "invalid signature"})

    def ready(self) -> Answer:
        try:
            self.queue.ping()
        except Exception as err:  # noqa: BLE001 — any failure means not ready
            return Answer(status=503, body={"ready": False, "reason": f"queue: {err}"})
        if not self.pool.alive():
            return Answer(status=503, body={"ready": False, "reason": "workers not running"})
        if not all(alive() for alive in self.background):
            return Answer(status=503, body={"ready": False, "reason": "reconciler not running"})
        return Answer(status=200, body={"ready": True})

    def metrics(self) -> str:
        """Prometheus text: queue depth, jobs by state, deliveries, release durations."""
        counts = self.queue.counts()
        lines = [
            "# HELP packager_webhook_queue_depth Jobs waiting to run (pending or failed).",
            "# TYPE packager_webhook_queue_depth gauge",
            f"packager_webhook_queue_depth {counts['pending'] + counts['failed']}",
            "# HELP packager_webhook_jobs Jobs in the queue by state.",
            "# TYPE packager_webhook_jobs gauge",
            *(f'packager_webhook_jobs{{state="{s}"}} {n}' for s, n in counts.items()),
            "# HELP packager_webhook_deliveries Deliveries accepted, by outcome.",
            "# TYPE packager_webhook_deliveries gauge",
            *(
                f'packager_webhook_deliveries{{outcome="{o}"}} {n}'
                for o, n in sorted(self.queue.deliveries().items())
            ),
        ]
        stats = self.pool.stats
        with stats.lock:
            lines += [
                "# HELP packager_webhook_attempts_total Release attempts since start, by outcome.",
                "# TYPE packager_webhook_attempts_total counter",
                *(
                    f'packager_webhook_attempts_total{{outcome="{o}"}} {n}'
                    for o, n in sorted(stats.outcomes.items())
                ),
                "# HELP packager_webhook_release_seconds Release attempt durations since start.",
                "# TYPE packager_webhook_release_seconds summary",
                f"packager_webhook_release_seconds_sum {stats.seconds_sum:.3f}",
                f"packager_webhook_release_seconds_count {stats.seconds_count}",
            ]
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "packager-webhook"
    sys_version = ""
    timeout = 30  # seconds a client may take to send its request; a stalled one is dropped
    # The answer goes out as two writes (head, then body): with Nagle's algorithm the body
    # waits for the client's delayed ACK of the head, 40 ms on Linux, on every answer.
    disable_nagle_algorithm = True

    def handle(self) -> None:
        # The TLS handshake runs here, on the connection's own thread and under the
        # socket's timeout (set by ``setup``), not in ``accept`` on the serving thread,
        # where one client that connects and sends nothing would stop every other accept.
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ValueError) as err:  # ssl.SSLError and timeouts are OSErrors
                log.debug("%s: TLS handshake failed: %s", self.client_address[0], err)
                self.close_connection = True
                return
        super().handle()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._answer(Answer(status=404, body={"error": f"POST to {PATH}"}))
            return
        receiver = self.server.receiver
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]{1,19}", length):
            self.close_connection = True
            self._answer(Answer(status=411, body={"error": "Content-Length required"}))
            return
        if int(length) > receiver.max_body:
            self.close_connection = True  # the unread body must not be parsed as a request
            self._answer(Answer(status=413, body={"error": f"body over {receiver.max_body} B"}))
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        refused = receiver.refuse_unsigned(headers, self.client_address[0])
        if refused is not None:
            self.close_connection = True  # its body is left unread
            self._answer(refused)
            return
        body = self._read_body(int(length))
        if body is None:
            self.close_connection = True
            return
        self._answer(receiver.handle_delivery(headers, body, self.client_address[0]))

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None when the client sent less, or took over
        :data:`REQUEST_SECONDS` in all (each read also has the socket's timeout)."""
        deadline = time.monotonic() + REQUEST_SECONDS
        parts: list[bytes] = []
        remaining = length
        while remaining:
            if time.monotonic() > deadline:
                log.debug("%s: body not sent in %.0f s", self.client_address[0], REQUEST_SECONDS)
                return None
            chunk = self.rfile.read1(min(remaining, 65536))
            if not chunk:
                return None
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def do_GET(self) -> None:
        receiver = self.server.receiver
        route = self.path.split("?", 1)[0]
        if route == "/livez":
            self._answer(Answer(status=200, body={"live": True}))
        elif route == "/readyz":
            self._answer(receiver.ready())
        elif route == "/metrics":
            self._send(200, receiver.metrics().encode(), "text/plain; version=0.0.4")
        elif route == PATH:
            self._answer(Answer(status=405, body={"error": "POST only"}))
        else:
            self._answer(Answer(status=404, body={"error": "not found"}))

    def _answer(self, answer: Answer) -> None:
        self._send(answer.status, json.dumps(answer.body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: MLflow's pool (10 senders) or a burst of new
    # connections would see SYNs dropped and retried a second later.
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], receiver: Receiver, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        super().__init__(address, _Handler)
        self.receiver = receiver
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        """A thread for the connection while there is a slot; else a 503 and close."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @staticmethod
    def _refuse(request: object) -> None:
        """503 on a plain connection (a TLS one is closed unanswered: its handshake
        would be done here, on the serving thread)."""
        if not isinstance(request, socket.socket) or isinstance(request, ssl.SSLSocket):
            return
        body = b'{"error": "too many connections; retry"}'
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        )
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass


class Server:
    """A running receiver: the HTTP server on a thread and the worker pool. Jobs left
    ``running`` by a previous process are recovered (:meth:`JobQueue.recover`) before the
    workers start."""

    def __init__(
        self,
        receiver: Receiver,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.receiver = receiver
        self._http = _Server((host, port), receiver, max_connections)
        if certfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certfile, keyfile)
            # The handshake is left to the connection's thread (see _Handler.handle).
            self._http.socket = context.wrap_socket(
                self._http.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.1,), name="webhook-http"
        )

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    def start(self) -> None:
        recovered = self.receiver.queue.recover()
        if recovered:
            log.warning(
                "%d job(s) interrupted by the last stop: retried after their backoff, or"
                " parked at the attempt limit",
                recovered,
            )
        self.receiver.pool.start()
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()
        self.receiver.pool.stop()
