"""``packager webhook serve`` as a library call: put the parts together, run until stopped.

:func:`serve` opens the queue (taking ownership), starts the receiver and its worker pool
(jobs a killed predecessor left running are queued again first), reconciles on start and
every ``reconcile_interval`` seconds on a thread of its own, and returns after SIGTERM or
SIGINT, once the HTTP server and the workers have stopped (a release still running then is
left ``running`` and recovered on the next start).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from packager.errors import PackagerError, UsageError
from packager.webhook.queue import MIN_KEEP_SECONDS, JobQueue, RetryPolicy
from packager.webhook.receiver import MAX_BODY, Receiver, Server
from packager.webhook.reconcile import RecipeFn, RegistryView, reconcile
from packager.webhook.rules import Rules
from packager.webhook.worker import ReleaseFn, WorkerPool, alias_check

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    rules: Rules
    secret: str
    queue: Path
    host: str = "127.0.0.1"
    port: int = 8787
    certfile: Path | None = None
    keyfile: Path | None = None
    workers: int = 1
    max_body: int = MAX_BODY
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reconcile_interval: float = 300.0  # 0: only on start
    keep_days: float = 30.0  # done jobs and their deliveries are forgotten after this

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: not a port number")
        if (self.certfile is None) != (self.keyfile is None):
            raise UsageError("TLS needs both --certfile and --keyfile")
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: at least 1")
        if self.max_body < 1024:
            raise UsageError(f"--max-body {self.max_body}: at least 1024 bytes")
        if self.retry.limit < 1 or self.retry.base < 0:
            raise UsageError("--retry-limit must be at least 1 and --retry-backoff not negative")
        if self.reconcile_interval < 0:
            raise UsageError("--reconcile-interval must not be negative (0: only on start)")
        if not self.keep_days * 86400 >= MIN_KEEP_SECONDS:  # NaN too
            raise UsageError(
                f"--keep-days {self.keep_days:g}: at least {MIN_KEEP_SECONDS / 86400:g}",
                hint="a shorter log would forget deliveries MLflow may still resend",
            )


# How often the queue is pruned when reconciliation runs at start only.
PRUNE_ONLY_SECONDS = 86400.0


class Reconciler:
    """Reconciliation on a daemon thread: once at start, then every ``interval`` seconds.
    A registry that cannot be read is logged and tried again at the next round: the
    receiver keeps accepting events meanwhile. Each round also prunes the queue of what
    is older than ``keep_seconds`` (done jobs and their deliveries), so a receiver that
    runs for months keeps a bounded file."""

    def __init__(
        self,
        rules: Rules,
        registry: Callable[[], RegistryView],
        queue: JobQueue,
        wake: Callable[[], None],
        interval: float,
        *,
        keep_seconds: float = 30 * 86400.0,
        recipe: RecipeFn | None = None,
    ) -> None:
        self.rules = rules
        self.recipe = recipe
        self.registry = registry
        self.queue = queue
        self.wake = wake
        self.interval = interval
        self.keep_seconds = keep_seconds
        self._stop = threading.Event()
        self._returned = False  # the loop ended as it should (interval 0, or stopped)
        self._thread = threading.Thread(target=self._loop, name="webhook-reconcile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        """False once the thread has died of an error (for ``/readyz``)."""
        return self._thread.ident is None or self._thread.is_alive() or self._returned

    def run_once(self) -> tuple[int, ...]:
        self.prune()
        try:
            ids = reconcile(self.rules, self.registry(), self.queue, recipe=self.recipe)
        except PackagerError as err:
            log.warning("reconciliation failed (%s): %s", self._next_try, err)
            return ()
        except Exception:  # a bug must not end reconciliation for good
            log.exception("reconciliation failed (%s)", self._next_try)
            return ()
        if ids:
            self.wake()
        return ids

    def prune(self) -> None:
        try:
            jobs, deliveries = self.queue.prune(keep_seconds=self.keep_seconds)
        except (PackagerError, sqlite3.Error) as err:
            log.warning("pruning the queue failed (%s): %s", self._next_try, err)
        except Exception:  # a bug must not end the loop for good
            log.exception("pruning the queue failed (%s)", self._next_try)
        else:
            if jobs or deliveries:
                log.info("pruned %d done job(s) and %d delivery record(s)", jobs, deliveries)

    @property
    def _next_try(self) -> str:
        return f"next try in {self.interval:.0f} s" if self.interval > 0 else "next at restart"

    def _loop(self) -> None:
        self.run_once()
        # With --reconcile-interval 0 the registry is read at start only, but the queue
        # is still pruned once a day.
        period = self.interval if self.interval > 0 else PRUNE_ONLY_SECONDS
        while not self._stop.wait(period):
            if self.interval > 0:
                self.run_once()
            else:
                self.prune()
        self._returned = True


def serve(
    options: ServeOptions,
    release: ReleaseFn,
    registry: Callable[[], RegistryView],
    *,
    started: Callable[[int], None] | None = None,
    recipe: RecipeFn | None = None,
) -> None:
    """Run the receiver until SIGTERM or SIGINT. ``started`` is called with the bound
    port once the receiver answers; ``recipe`` lets reconciliation compare the lock and
    base a release would use now (:func:`packager.webhook.worker.recipe_function`)."""
    options.check()
    queue = JobQueue(options.queue, retry=options.retry)
    try:
        pool = WorkerPool(queue, release, size=options.workers, alias_check=alias_check(registry))
        receiver = Receiver(
            secret=options.secret,
            rules=options.rules,
            queue=queue,
            pool=pool,
            max_body=options.max_body,
        )
        try:
            server = Server(
                receiver,
                host=options.host,
                port=options.port,
                certfile=options.certfile,
                keyfile=options.keyfile,
            )
        except OSError as err:
            raise UsageError(
                f"cannot listen on {options.host}:{options.port}: {err.strerror or err}",
                hint="choose another --port, or stop what uses it",
            ) from err
        stopping = threading.Event()

        def stop(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
            stopping.set()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        reconciler = Reconciler(
            options.rules,
            registry,
            queue,
            pool.wake,
            options.reconcile_interval,
            keep_seconds=options.keep_days * 86400,
            recipe=recipe,
        )
        receiver.background.append(reconciler.alive)
        server.start()
        try:
            reconciler.start()
            if started is not None:
                started(server.port)
            stopping.wait()
            log.info("stopping: no new deliveries; waiting for running releases")
        finally:
            reconciler.stop()
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        queue.close()
