"""The worker pool: claim a job, run the release, record how it ended.

The release is a function given to the pool (:data:`ReleaseFn`): in use, the one
:func:`release_function` makes, which calls :func:`packager.release.release_model` (never
the CLI); unit tests pass a fake. Errors that another attempt cannot fix (a malformed reference or
image, a model that is not servable, an image that fails its test) park the job at once;
the rest retry with the queue's backoff up to its limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packager.api import ImageOptions
from packager.errors import (
    ImageTestError,
    ModelFormatError,
    NotServableError,
    PackagerError,
    UsageError,
)
from packager.redact import scrub
from packager.source import RegistryOptions
from packager.webhook.queue import Job, JobQueue
from packager.webhook.rules import JobSpec

log = logging.getLogger(__name__)

# Returns a one-line summary of the release (recorded as the job's result).
ReleaseFn = Callable[[JobSpec], str]

PERMANENT: tuple[type[PackagerError], ...] = (
    UsageError,
    ModelFormatError,
    NotServableError,
    ImageTestError,
)


def release_function(
    registry: RegistryOptions | None = None,
    cache_root: Path | None = None,
    *,
    image: ImageOptions | None = None,
) -> ReleaseFn:
    """The real release, for one registry: :func:`packager.release.release_model` with
    the options the job's rule chose. The event's own alias is not moved again (MLflow
    already moved it, and a slow release must not move it back from a newer version);
    only the rule's ``release.alias`` is. ``image`` (base image, system packages, lock
    options) applies to every release."""

    def run_release(spec: JobSpec) -> str:
        from packager.release import ReleaseOptions, release_model  # noqa: PLC0415 — heavy

        choices = spec.release
        report = release_model(
            spec.model,
            ReleaseOptions(
                tags=(spec.image,),
                image=image or ImageOptions(),
                backend=choices.backend,
                test=choices.test,
                alias=choices.alias,
                force=choices.force,
                attestations=choices.attestations,
            ),
            registry=registry,
            cache_root=cache_root,
        )
        return f"{report.status}: {report.image}"

    return run_release


@dataclass
class Stats:
    """Release durations and outcomes since start, for ``/metrics``."""

    outcomes: dict[str, int] = field(default_factory=dict)
    seconds_sum: float = 0.0
    seconds_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.seconds_sum += seconds
            self.seconds_count += 1


class WorkerPool:
    """``size`` threads that run jobs until :meth:`stop`. :meth:`wake` (called after an
    accept) starts a job without waiting for the next poll."""

    def __init__(
        self,
        queue: JobQueue,
        release: ReleaseFn,
        *,
        size: int = 1,
        poll: float = 1.0,
    ) -> None:
        if size < 1:
            raise UsageError("the worker pool needs at least one worker", hint="--workers 1")
        self.queue = queue
        self.release = release
        self.size = size
        self.poll = poll
        self.stats = Stats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.size):
            thread = threading.Thread(target=self._loop, name=f"webhook-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; wait up to ``timeout`` for running jobs (a job still running
        after that is left ``running`` and recovered on the next start)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.claim()
            except Exception:
                log.exception("the webhook queue could not be read; retrying")
                job = None
            if job is None:
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            self.run_one(job)

    def run_one(self, job: Job) -> None:
        """Run a claimed job and record its end in the queue."""
        log.info(
            "job %d: releasing %s to %s (attempt %d)",
            job.id,
            job.spec.model,
            job.spec.image,
            job.attempts,
        )
        start = time.monotonic()
        try:
            result = self.release(job.spec)
        except Exception as err:  # noqa: BLE001 — every failure is recorded on the job
            seconds = time.monotonic() - start
            permanent = isinstance(err, PERMANENT)
            message = scrub(err.message if isinstance(err, PackagerError) else repr(err))
            state = self.queue.fail(job, message, seconds=seconds, permanent=permanent)
            self.stats.add(state, seconds)
            log.warning("job %d: %s (%s)", job.id, message, state)
            return
        seconds = time.monotonic() - start
        if self.queue.complete(job, result, seconds=seconds):
            self.stats.add("done", seconds)
            log.info("job %d: %s in %.1f s", job.id, result, seconds)
        else:
            log.warning("job %d finished but its claim was taken back; not recorded", job.id)
