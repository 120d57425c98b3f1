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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

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
from packager.webhook.reconcile import RecipeFn, RegistryView
from packager.webhook.rules import JobSpec

log = logging.getLogger(__name__)

# Returns a one-line summary of the release (recorded as the job's result).
ReleaseFn = Callable[[JobSpec], str]


@runtime_checkable
class AttemptRelease(Protocol):
    """A release function that also takes the queue's job id and attempt (the
    dispatcher: each attempt is its own Kubernetes Job)."""

    def __call__(self, spec: JobSpec) -> str: ...

    def release_attempt(self, spec: JobSpec, *, job_id: int, attempt: int) -> str: ...


# Why the job's ``release.alias`` must not be moved now (None: it may be).
AliasCheck = Callable[[JobSpec], str | None]

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
    only the rule's ``release.alias`` is, and the pool drops that one from a job whose
    triggering state no longer holds (:func:`alias_check`). ``image`` (base image,
    system packages, lock options) applies to every release."""

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


def recipe_function(
    registry: RegistryOptions | None = None,
    cache_root: Path | None = None,
    *,
    image: ImageOptions | None = None,
) -> RecipeFn:
    """What :func:`release_function`'s release of a job would record as its recipe now
    (:func:`packager.release.current_recipe`, with the same options): reconciliation's
    look at versions whose recorded image was made by this packager version."""

    def recipe(spec: JobSpec) -> Mapping[str, str]:
        from packager.release import ReleaseOptions, current_recipe  # noqa: PLC0415 — heavy

        return current_recipe(
            spec.model,
            ReleaseOptions(tags=(spec.image,), image=image or ImageOptions()),
            registry=registry,
            cache_root=cache_root,
        )

    return recipe


def alias_check(registry: Callable[[], RegistryView]) -> AliasCheck:
    """The check made just before a job runs, so that a retried, late or re-queued job
    never moves the rule's ``release.alias`` back to an older version:

    - an alias-triggered job moves it only while the triggering alias still points at
      the job's version (a deliberate move back of that alias is followed);
    - any other job moves it only while it does not point at a newer version, and a job
      of a rule for every new version only while no newer version exists.

    A registry that cannot be read raises: the job fails and is tried again later."""

    def check(spec: JobSpec) -> str | None:
        alias = spec.release.alias
        if alias is None:
            return None
        view = registry()
        if spec.trigger_alias is not None:
            current = view.by_alias(spec.name, spec.trigger_alias)
            if current is None or current.version != spec.version:
                where = "no version" if current is None else f"version {current.version}"
                return f"{spec.trigger_alias} now points at {where}"
            return None
        moved = view.by_alias(spec.name, alias)
        if moved is not None and _newer(moved.version, spec.version):
            return f"{alias} already points at the newer version {moved.version}"
        if spec.newest_only:
            newer = [v.version for v in view.versions(spec.name) if _newer(v.version, spec.version)]
            if newer:
                return f"a newer version exists ({max(newer, key=int)})"
        return None

    return check


def _newer(version: str, than: str) -> bool:
    return version.isdigit() and than.isdigit() and int(version) > int(than)


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
        alias_check: AliasCheck | None = None,
    ) -> None:
        if size < 1:
            raise UsageError("the worker pool needs at least one worker", hint="--workers 1")
        self.queue = queue
        self.release = release
        self.size = size
        self.poll = poll
        self.alias_check = alias_check
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
            try:
                self.run_one(job)
            except Exception:  # recording the end failed: the worker goes on
                log.exception("job %d: its end could not be recorded", job.id)
                self._stop.wait(self.poll)

    def _alias_guarded(self, job: Job) -> JobSpec:
        """The job's spec, without its ``release.alias`` when :attr:`alias_check` says
        moving it now would move it back."""
        spec = job.spec
        if self.alias_check is None or spec.release.alias is None:
            return spec
        reason = self.alias_check(spec)
        if reason is None:
            return spec
        log.warning(
            "job %d: releasing %s without moving the alias %r: %s",
            job.id,
            spec.model,
            spec.release.alias,
            reason,
        )
        return replace(spec, release=replace(spec.release, alias=None))

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
            spec = self._alias_guarded(job)
            if isinstance(self.release, AttemptRelease):
                result = self.release.release_attempt(spec, job_id=job.id, attempt=job.attempts)
            else:
                result = self.release(spec)
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
