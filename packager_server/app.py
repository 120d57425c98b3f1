"""The ASGI application each worker serves (through uvicorn), and its HTTP details.

Endpoints (MLflow's, plus probes and metrics):

=================  ======  ==============================================================
path               method  answer
=================  ======  ==============================================================
/invocations       POST    predictions (:mod:`packager_server.scoring`)
/ping, /health     GET     200 once the model is loaded (MLflow and SageMaker probes)
/ready, /readyz    GET     same: Kubernetes readiness
/live, /livez      GET     200 whenever the process runs, even while loading
/version           GET     the MLflow version, as MLflow answers it
/metrics           GET     Prometheus text format
/v2/...            both    the Open Inference Protocol (:mod:`packager_server.v2`)
/execution-        GET     SageMaker batch transform's defaults
parameters
=================  ======  ==============================================================

Vertex AI's ``AIP_HEALTH_ROUTE`` and ``AIP_PREDICT_ROUTE``, and the batch transform bodies
of ``/invocations``, are :mod:`packager_server.platforms`'. None of them costs MLflow's
``/invocations`` anything but one comparison of its content type.

Where predictions run: a fast model (recent average under ``INLINE_BUDGET``) is called
right on the event loop, because handing each request to a thread costs ~0.5 ms (measured
by benchmarks/server_bench.py: it halves the latency of a 0.4 ms model). A slow model runs
on one thread per worker, so that the event loop keeps answering probes meanwhile.

Timeouts: inline, a SIGALRM interrupts the prediction; on the thread, the event loop
stops waiting. Either way the client gets a 504 and the worker retires: it stops
accepting, answers its queued requests with 503, and exits, and the supervisor forks a
fresh copy from the loaded model (a stuck thread cannot be killed any other way; MLflow's
server lets it run on). Neither works when the prediction is stuck in C code that holds
the GIL, or that never returns to Python on the event loop's thread: the worker then runs
no Python at all. For that, the start of the worker's oldest prediction is in shared
memory (its busy mark), with the state of every connection
(:mod:`packager_server.takeover`): one second past the timeout the supervisor stops the
worker, answers the 504 itself (and 503 to the worker's other outstanding requests), and
replaces it. A prediction abandoned on the thread keeps the busy mark, so that a retiring
worker that cannot exit (that thread took the GIL) is replaced the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional; workers then use JsonErrorsH11
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]

from packager_server import __version__, platforms
from packager_server.config import ServerConfig
from packager_server.connections import SLOT_KEY, GuardedConnection
from packager_server.logs import log_access
from packager_server.metrics import SharedMetrics, route_label
from packager_server.scoring import JSON, Answer, Scorer, error_answer
from packager_server.takeover import Lifeline, deadline_message
from packager_server.v2 import OpenInference
from packager_server.v2 import error as v2_error

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

INLINE_BUDGET = 0.05  # seconds
_SMOOTHING = 0.2  # weight of the newest prediction in the running average
_PROBES = {"/ping", "/health", "/ready", "/readyz", "/v2/health/ready"}
_LIVE = {"/live", "/livez", "/v2/health/live"}
_V2_MODELS = "/v2/models/"
_MAX_REQUEST_ID = 128
_MAX_BACKLOG = 4096  # connections a stopping worker takes from the listen backlog
_NO_ENDPOINT = (
    "no such endpoint; this server answers /invocations, /ping, /health, /ready, /live, "
    "/version, /metrics and /v2 (the Open Inference Protocol)"
)


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """What the worker reports about itself (labels, /version)."""

    model_name: str
    model_version: str
    mlflow_version: str
    load_seconds: float
    serving_mode: str = "fork"  # or "spawn": see config.py's --serving-mode


class ScoringApp:
    """One per worker process."""

    def __init__(
        self,
        *,
        scorer: Scorer,
        config: ServerConfig,
        metrics: SharedMetrics,
        row: int,
        info: ServerInfo,
        retire: Callable[[], None],
        lifeline: Lifeline | None = None,
    ) -> None:
        self.scorer = scorer
        self.config = config
        self.metrics = metrics
        self.row = row
        self.info = info
        self._retire = retire
        self._lifeline = lifeline
        # Predictions not yet answered (one inline; on the thread, queued ones too), by
        # number, with their start: the oldest is the worker's busy mark.
        self._in_flight: dict[int, float] = {}
        self._numbers = itertools.count()
        # The start of a prediction left running on the thread after its timeout: it
        # stays the busy mark, for the supervisor to replace this worker should it not
        # exit (its hard-exit timer needs the GIL, which that thread may hold).
        self._abandoned = 0.0
        self._labels = (("model", info.model_name), ("version", info.model_version))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._pending: set[concurrent.futures.Future[Answer]] = set()
        self.retiring = False
        self._average = 0.0  # recent prediction time, seconds
        self._in_inline_prediction = False
        self._v2: OpenInference | None = None  # built on first use
        signal.signal(signal.SIGALRM, self._on_alarm)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = _request_id(headers.get("x-request-id"))
        path, method = scope["path"], scope["method"]
        slot: int | None = scope.get("state", {}).get(SLOT_KEY)
        if path == "/invocations" and method == "POST":
            answer, close = await self._invocations(headers, receive, slot, request_id)
        elif method == "POST" and (invoke := self._post_route(path)) is not None:
            if isinstance(invoke, Answer):  # a 404 for another model: the body is not read
                answer, close = invoke, True
            else:
                label = route_label(
                    path,
                    predict_route=self.config.predict_route,
                    health_route=self.config.health_route,
                )
                answer, close = await self._invocations(
                    headers, receive, slot, request_id, invoke, label=label
                )
        else:
            answer, close = await self._route(path, method)
        response_headers = [
            (b"content-type", answer.content_type.encode()),
            (b"content-length", str(len(answer.body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        if answer.score_seconds is not None:
            response_headers.append((b"server-timing", _server_timing(answer)))
        if close:
            response_headers.append((b"connection", b"close"))
        if answer.status == 405:
            allowed = b"POST" if path == "/invocations" or path.endswith("/infer") else b"GET, HEAD"
            response_headers.append((b"allow", allowed))
        # Count the request before answering it: a client that reads /metrics right after
        # its answer (perhaps from another worker) must already see it.
        elapsed = time.perf_counter() - started
        label = route_label(
            path, predict_route=self.config.predict_route, health_route=self.config.health_route
        )
        self.metrics.observe(self.row, label, answer.status, elapsed)
        if slot is not None and self._lifeline is not None:
            self._lifeline.writing(slot)  # from here on the supervisor must not write
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else answer.body})
        if self.config.access_log:
            self._log_access(
                scope,
                method=method,
                path=path,
                answer=answer,
                elapsed=elapsed,
                request_id=request_id,
            )

    @property
    def v2(self) -> OpenInference:
        if self._v2 is None:
            self._v2 = OpenInference(
                self.scorer, name=self.info.model_name, version=self.info.model_version
            )
        return self._v2

    def _post_route(self, path: str) -> platforms.Invoke | Answer | None:
        """The handler of a POST to ``path`` other than ``/invocations`` (an answer when
        the path names another model; ``None`` when no POST goes there)."""
        if path == self.config.predict_route:
            return platforms.vertex_invoker(self.scorer)
        if path.startswith(_V2_MODELS):
            action, problem = self.v2.target(path)
            if problem is not None:
                return problem
            if action == "infer":
                return self.v2.invoker()
        return None

    async def _route(self, path: str, method: str) -> tuple[Answer, bool]:
        """Everything but the POSTs that predict."""
        if path == "/invocations":
            return error_answer(405, "BAD_REQUEST", "use POST for /invocations"), False
        if path == self.config.health_route:
            path = "/ready"  # Vertex AI's health route
        if path.startswith(_V2_MODELS):
            return self._v2_route(path, method), False
        if method not in ("GET", "HEAD"):
            known = path in _PROBES | _LIVE | {"/version", "/metrics", "/v2"}
            if known:
                return error_answer(405, "BAD_REQUEST", f"use GET for {path}"), False
        if path in _PROBES:
            if self.retiring:
                return error_answer(503, "TEMPORARILY_UNAVAILABLE", "worker restarting"), True
            return Answer(status=200, body=b"\n"), False  # MLflow's exact answer
        if path in _LIVE:
            return Answer(status=200, body=b'{"status": "alive"}'), False
        if path == "/version":
            return Answer(status=200, body=self.info.mlflow_version.encode()), False
        if path == "/v2":
            return self.v2.server_metadata(__version__), False
        if path == "/execution-parameters":
            return platforms.execution_parameters(
                workers=self.config.workers, max_payload=self.config.max_payload
            ), False
        if path == "/metrics":
            body = self.metrics.render(
                self._labels,
                workers=self.config.workers,
                load_seconds=self.info.load_seconds,
                serving_mode=self.info.serving_mode,
            )
            return Answer(
                status=200, body=body, content_type="text/plain; version=0.0.4; charset=utf-8"
            ), False
        # The path is not echoed: an answer (or a log line) never carries request data.
        return error_answer(404, "RESOURCE_DOES_NOT_EXIST", _NO_ENDPOINT), False

    def _v2_route(self, path: str, method: str) -> Answer:
        action, problem = self.v2.target(path)
        if problem is not None:
            return problem
        if action == "infer":
            return v2_error(405, "BAD_REQUEST", "use POST for inference")
        if method not in ("GET", "HEAD"):
            return v2_error(405, "BAD_REQUEST", "use GET for model metadata and readiness")
        if action == "ready":
            if self.retiring:
                return v2_error(503, "TEMPORARILY_UNAVAILABLE", "worker restarting")
            return Answer(status=200, body=b"")
        return self.v2.metadata()

    async def _invocations(
        self,
        headers: dict[str, str],
        receive: Receive,
        slot: int | None,
        request_id: str,
        invoke: platforms.Invoke | None = None,
        *,
        label: str = "/invocations",
    ) -> tuple[Answer, bool]:
        limit = self.config.max_payload
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return error_answer(400, "BAD_REQUEST", "invalid Content-Length"), True
            if int(declared) > limit:
                # Refuse before reading: the body is never buffered.
                return _too_large(limit), True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return error_answer(400, "BAD_REQUEST", "client disconnected"), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _too_large(limit), True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if self.retiring:
            return error_answer(503, "TEMPORARILY_UNAVAILABLE", "worker restarting; retry"), True
        body = b"".join(chunks)
        content_type = headers.get("content-type")
        if invoke is None:
            invoke = self.scorer.invoke
            # Batch transform's bodies (SageMaker); MLflow's JSON passes one comparison.
            if content_type and content_type != JSON:
                kind = platforms.batch_format(content_type)
                if kind is not None:
                    invoke = platforms.batch_invoker(self.scorer, kind, headers.get("accept"))
            if platforms.wants_csv(headers.get("accept")):
                invoke = platforms.csv_output(invoke)
        answer = await self._predict(body, content_type, slot, request_id, invoke, label=label)
        return answer, False

    async def _predict(
        self,
        body: bytes,
        content_type: str | None,
        slot: int | None,
        request_id: str,
        invoke: platforms.Invoke,
        *,
        label: str,
    ) -> Answer:
        number = self._began(slot, request_id, label)
        started = time.perf_counter()
        try:
            if self._average <= INLINE_BUDGET:
                answer = self._predict_inline(invoke, body, content_type)
            else:
                answer = await self._predict_on_thread(invoke, body, content_type, number)
        finally:
            self._ended(number, slot)
        elapsed = time.perf_counter() - started
        self._average += _SMOOTHING * (elapsed - self._average)
        return answer

    def _began(self, slot: int | None, request_id: str, label: str) -> int:
        """Mark a prediction started: for the supervisor, which answers it if the worker
        is still in it one second past the timeout."""
        number, now = next(self._numbers), time.monotonic()
        if not self._in_flight:
            self.metrics.busy(self.row, now)
        self._in_flight[number] = now
        if slot is not None and self._lifeline is not None:
            self._lifeline.predicting(slot, now, request_id, label)
        return number

    def _ended(self, number: int, slot: int | None) -> None:
        """Unmark it, before its answer is written (or the worker answered it itself)."""
        if slot is not None and self._lifeline is not None:
            self._lifeline.predicted(slot)
        del self._in_flight[number]
        # The oldest one left is the first in the dict: they were added in time order.
        marks = [t for t in (next(iter(self._in_flight.values()), 0.0), self._abandoned) if t]
        self.metrics.busy(self.row, min(marks, default=0.0))

    def _predict_inline(
        self, invoke: platforms.Invoke, body: bytes, content_type: str | None
    ) -> Answer:
        signal.setitimer(signal.ITIMER_REAL, self.config.timeout)
        self._in_inline_prediction = True
        try:
            return invoke(body, content_type)
        except _Deadline:
            self._retire_worker()
            return self._deadline_answer()
        finally:
            self._in_inline_prediction = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_alarm(self, signum: int, frame: object) -> None:  # noqa: ARG002 - signal API
        if self._in_inline_prediction:  # a late alarm outside a prediction is ignored
            raise _Deadline

    async def _predict_on_thread(
        self, invoke: platforms.Invoke, body: bytes, content_type: str | None, number: int
    ) -> Answer:
        future = self._executor.submit(invoke, body, content_type)
        self._pending.add(future)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.config.timeout)
        except asyncio.TimeoutError:
            self._abandoned = self._in_flight[number]
            self._retire_worker()
            return self._deadline_answer()
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            if future.cancelled() and self.retiring:
                return error_answer(
                    503, "TEMPORARILY_UNAVAILABLE", "worker restarting after a timeout; retry"
                )
            raise
        finally:
            self._pending.discard(future)

    def _deadline_answer(self) -> Answer:
        return error_answer(504, "DEADLINE_EXCEEDED", deadline_message(self.config.timeout))

    def _retire_worker(self) -> None:
        if self.retiring:
            return
        self.retiring = True
        for future in list(self._pending):
            future.cancel()  # only queued ones; the stuck one runs on
        log.error("a prediction exceeded %gs; retiring worker %d", self.config.timeout, self.row)
        self._retire()

    def _log_access(
        self,
        scope: Scope,
        *,
        method: str,
        path: str,
        answer: Answer,
        elapsed: float,
        request_id: str,
    ) -> None:
        log_access(
            self.config.log_format,
            client=str((scope.get("client") or ("-", 0))[0]),
            method=method,
            path=path,
            status=answer.status,
            seconds=elapsed,
            size=len(answer.body),
            request_id=request_id,
            route=answer.route,
            score_seconds=answer.score_seconds,
            model_seconds=answer.model_seconds,
            worker=self.row,
        )


class _Deadline(BaseException):
    """Raised by SIGALRM inside an inline prediction that overran the timeout."""


def _server_timing(answer: Answer) -> bytes:
    """W3C Server-Timing: where the time of a scored request went, in milliseconds."""
    timing = f"score;dur={1000 * (answer.score_seconds or 0.0):.3f}"
    if answer.model_seconds is not None:
        timing += f", model;dur={1000 * answer.model_seconds:.3f}"
    return timing.encode()


def _too_large(limit: int) -> Answer:
    return error_answer(
        413, "REQUEST_LIMIT_EXCEEDED", f"the request body exceeds the {limit}-byte limit"
    )


def _request_id(given: str | None) -> str:
    """The client's X-Request-ID if it is one printable ASCII word, else a new one.

    No spaces: in the text access log, a space in it would forge the fields after it.
    """
    if (
        given
        and len(given) <= _MAX_REQUEST_ID
        and given.isascii()
        and given.isprintable()
        and " " not in given
    ):
        return given
    return uuid.uuid4().hex


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- uvicorn's protocols: JSON for malformed HTTP (uvicorn answers it in plain text), and
# the header timeout and shutdown of connections.GuardedConnection ---------------------

_BAD_HTTP = json.dumps({"error_code": "BAD_REQUEST", "message": "invalid HTTP request"}).encode()
_BAD_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: "
    + JSON.encode()
    + b"\r\ncontent-length: "
    + str(len(_BAD_HTTP)).encode()
    + b"\r\nconnection: close\r\n\r\n"
    + _BAD_HTTP
)


class JsonErrorsHttpTools(GuardedConnection, HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's text
        self.writing()
        self.transport.write(_BAD_HTTP_RESPONSE)
        self.transport.close()


class JsonErrorsH11(GuardedConnection, H11Protocol):
    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's text
        self.writing()
        self.transport.write(_BAD_HTTP_RESPONSE)
        self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on SIGTERM it first takes the connections in the listen backlog.

    The listening socket is shared by the supervisor and every worker, and the kernel
    keeps completed connections in its backlog until one of them accepts them. Once the
    last process closes the socket, the kernel resets every connection still there, though
    each was accepted as far as its client knows (``connect`` returned, the request may be
    sent). So a stopping worker accepts them all and answers them like the others. A
    retiring worker (``take_backlog`` false) leaves them to its replacement.
    """

    take_backlog = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.take_backlog:
            for listener in sockets or []:
                await self._take_backlog(listener)
        await super().shutdown(sockets)

    async def _take_backlog(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for _ in range(_MAX_BACKLOG):
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            conn.setblocking(False)
            await loop.connect_accepted_socket(protocol, conn)
