"""The durable queue: every accepted delivery and the release jobs it made, in SQLite.

Why SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when
:meth:`JobQueue.accept` returns, and the receiver answers 2xx only after that, so an
event MLflow saw acknowledged survives ``kill -9`` and a power cut; WAL lets the HTTP
threads write while workers read. One receiver process owns a queue file (an advisory
lock refuses a second one), which is what makes :meth:`JobQueue.recover` safe: a job
still ``running`` when the queue is opened belonged to a process that is gone, and its
interrupted attempt counts as a failed one (backoff, then parked at the limit). Other
processes (``packager webhook jobs`` and ``retry``) open it with ``owner=False``: no lock,
so they work while the receiver runs; they may read and requeue, never recover.

Job states::

    pending ──claim──▶ running ──complete──▶ done
       ▲                  │
       │                  └──fail──▶ failed (waits out its backoff, then is claimed again)
       │                               └─ at the attempt limit, or a permanent error ─▶ parked
       └──────────── retry (by hand) ◀──────────────────────────────────────────────┘

Exactly once to completion: a job reaches ``done`` once, from the one claim that holds it
(complete/fail check the claim's token). A crash between the release finishing and
``complete`` re-runs the release, which then answers "already released" (see
:mod:`packager.release`): harmless, and the job completes once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager.errors import CacheError, UsageError
from packager.webhook.rules import JobSpec

# The shortest delivery log :meth:`JobQueue.prune` keeps: a day, far beyond MLflow's
# retries, the signature's 5-minute window and reconciliation's hour of recent jobs.
MIN_KEEP_SECONDS = 86400.0

State = Literal["pending", "running", "done", "failed", "parked"]
STATES: tuple[State, ...] = ("pending", "running", "done", "failed", "parked")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    received REAL NOT NULL,
    outcome TEXT NOT NULL            -- queued | ignored
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id TEXT NOT NULL REFERENCES deliveries(delivery_id),
    key TEXT NOT NULL,
    spec TEXT NOT NULL,              -- JobSpec as JSON
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    claim TEXT,                      -- token of the claim that runs it
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    seconds REAL                     -- the last attempt's duration
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, not_before);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key, state);
CREATE INDEX IF NOT EXISTS jobs_delivery ON jobs(delivery_id);
"""


@dataclass(frozen=True, kw_only=True)
class Accepted:
    duplicate: bool  # the delivery id was accepted before: nothing new queued
    job_ids: tuple[int, ...]


@dataclass(kw_only=True)
class _Request:
    """One delivery waiting for a group commit, and how it ended."""

    delivery_id: str
    event: str
    jobs: tuple[JobSpec, ...]
    stamp: float
    result: Accepted | None = None
    error: Exception | None = None


@dataclass(frozen=True, kw_only=True)
class Job:
    id: int
    delivery_id: str
    spec: JobSpec
    state: State
    attempts: int
    not_before: float
    claim: str | None
    error: str | None
    result: str | None
    created: float
    updated: float
    seconds: float | None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff between attempts, ``base * 2**(n-1)`` capped, ``limit`` in all."""

    limit: int = 5
    base: float = 30.0
    cap: float = 1800.0

    def delay(self, attempts: int) -> float:
        return float(min(self.cap, self.base * 2 ** max(attempts - 1, 0)))


class JobQueue:
    """The queue file at ``path``; thread-safe (one connection behind one lock; deliveries
    wait for their group commit on a condition of their own).

    ``owner=False`` opens an existing queue beside the receiver that owns it (for
    ``jobs`` and ``retry``): no ownership lock is taken, and a missing file is an error
    rather than a new queue."""

    def __init__(self, path: Path, *, retry: RetryPolicy | None = None, owner: bool = True) -> None:
        self.path = path
        self.retry = retry or RetryPolicy()
        self.owner = owner
        self._lock = threading.Lock()
        # Group commit: deliveries wait here; one of them at a time (the leader) commits
        # every waiting one, and the others sleep on the condition until theirs is done.
        self._group = threading.Condition(threading.Lock())
        self._waiting: list[_Request] = []
        self._committing = False
        if not owner and not path.is_file():
            raise UsageError(
                f"there is no webhook queue at {path}",
                hint="pass the --queue that `packager webhook serve` uses",
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = self._take_ownership(path) if owner else -1
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise CacheError(f"cannot open the webhook queue {path}: {err}") from err

    @staticmethod
    def _take_ownership(path: Path) -> int:
        """An exclusive ``flock`` on ``PATH.lock`` for the process's lifetime (the kernel
        drops it when the process dies, however it dies)."""
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another receiver already uses the queue {path}",
                hint="stop it first, or give this one its own --queue file",
            ) from None
        return fd

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._owner >= 0:
                os.close(self._owner)

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` under the lock; rolled back on any error.

        ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``: in
        WAL mode the commit survives the process's death, and the next durable commit
        or checkpoint syncs it). For the workers' own transitions (claim, done, failed)
        only: losing one to a power cut re-runs a release, which then answers "already
        released"; and their fsyncs no longer hold the lock that accepts wait for."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def accept(
        self, delivery_id: str, event: str, jobs: tuple[JobSpec, ...], *, now: float | None = None
    ) -> Accepted:
        """Record the delivery and queue its jobs, committed before this returns. A
        delivery id seen before queues nothing; a job the same as one still pending is not
        queued twice, and one the same as a failed one waiting out its backoff joins it
        and ends the wait. A job the same as a running one is queued (the state it
        releases may have changed since that run began), and :meth:`claim` holds it back
        until that run ends.

        Group commit: deliveries that arrive while another commit is on its way to the
        disk wait for it, then one of them (the leader) commits them all in one
        transaction (one fsync) while the others sleep until the leader wakes them, so
        under load the answer waits for about one fsync rather than one per delivery
        ahead of it. (Each delivery taking the connection's lock in turn only to find its
        work done, as before, left some waiting out many commits: an unfair lock lets the
        thread that just released it take it again.)"""
        stamp = time.time() if now is None else now
        request = _Request(delivery_id=delivery_id, event=event, jobs=jobs, stamp=stamp)
        with self._group:
            self._waiting.append(request)
            while request.result is None and request.error is None:
                if self._committing:
                    self._group.wait()
                    continue
                self._committing = True
                batch, self._waiting = self._waiting, []
                try:
                    self._group.release()
                    with self._lock:
                        self._commit(batch)
                finally:
                    self._group.acquire()
                    self._committing = False
                    for waiting in batch:  # the leader was interrupted: never wait forever
                        if waiting.result is None and waiting.error is None:
                            waiting.error = CacheError("the commit was interrupted; retry")
                    self._group.notify_all()
        if request.error is not None:
            raise request.error
        if request.result is None:  # pragma: no cover - every batch sets one or the other
            raise CacheError(f"delivery {delivery_id} was not committed")
        return request.result

    def _commit(self, batch: list[_Request]) -> None:
        """One transaction for the batch (under ``self._lock``); on failure, every request
        in it gets the error (the receiver answers 503 and MLflow sends it again)."""
        results: list[Accepted] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for request in batch:
                    results.append(self._accept_one(self._db, request))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except Exception as err:  # noqa: BLE001 — handed to each waiting request
            for request in batch:
                request.error = err
            return
        for request, result in zip(batch, results, strict=True):
            request.result = result

    def _accept_one(self, db: sqlite3.Connection, request: _Request) -> Accepted:
        inserted = db.execute(
            "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
            (
                request.delivery_id,
                request.event,
                request.stamp,
                "queued" if request.jobs else "ignored",
            ),
        ).rowcount
        if not inserted:
            return Accepted(duplicate=True, job_ids=())
        ids = [self._queue_one(db, request.delivery_id, job, request.stamp) for job in request.jobs]
        return Accepted(duplicate=False, job_ids=tuple(ids))

    @staticmethod
    def _queue_one(db: sqlite3.Connection, delivery_id: str, job: JobSpec, now: float) -> int:
        row = db.execute(
            "SELECT id, state FROM jobs WHERE key = ? AND state IN ('pending', 'failed')"
            " ORDER BY id LIMIT 1",
            (job.key,),
        ).fetchone()
        if row is not None:
            if row[1] == "failed":  # a new event for it: try again now, not after the wait
                db.execute(
                    "UPDATE jobs SET not_before = 0, updated = ? WHERE id = ?", (now, row[0])
                )
            return int(row[0])
        cursor = db.execute(
            "INSERT INTO jobs (delivery_id, key, spec, state, created, updated)"
            " VALUES (?, ?, ?, 'pending', ?, ?)",
            (delivery_id, job.key, json.dumps(job.to_json(), sort_keys=True), now, now),
        )
        return int(cursor.lastrowid or 0)

    def active_keys(self, *, done_since: float | None = None) -> frozenset[str]:
        """Keys of the jobs not done: pending, running, waiting to retry, or parked (a
        parked job waits for `packager webhook retry`, not for reconciliation); and, with
        ``done_since``, of those done after that time."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT key FROM jobs WHERE state != 'done' OR updated >= ?",
                (float("inf") if done_since is None else done_since,),
            ).fetchall()
        return frozenset(str(row[0]) for row in rows)

    def recover(self, *, now: float | None = None) -> int:
        """Put back jobs left ``running`` by a process that died; how many there were.
        Call once, right after opening (this process owns the queue, so nothing else
        can be running them).

        An interrupted attempt counts as a failed one: the job waits out its backoff, and
        at the attempt limit it is parked. A release that kills the receiver itself (out
        of memory, say) would otherwise restart it forever."""
        if not self.owner:
            raise UsageError("only the receiver that owns the queue may recover its jobs")
        stamp = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for job_id, attempts in rows:
                n = int(attempts)
                if n >= self.retry.limit:
                    state, not_before = "parked", stamp
                    error = (
                        f"parked after {n} attempt(s), the last interrupted: the receiver"
                        " stopped or died while the job ran (killed for memory?)"
                    )
                else:
                    state, not_before = "failed", stamp + self.retry.delay(n)
                    error = f"interrupted: the receiver stopped while attempt {n} ran"
                db.execute(
                    "UPDATE jobs SET state = ?, claim = NULL, not_before = ?, updated = ?,"
                    " error = ? WHERE id = ?",
                    (state, not_before, stamp, error, job_id),
                )
            return len(rows)

    def claim(self, *, now: float | None = None) -> Job | None:
        """The oldest job due (pending, or failed and past its backoff), now running;
        never one whose key is running already (the same release twice at once)."""
        stamp = time.time() if now is None else now
        token = uuid.uuid4().hex
        with self._transaction(durable=False) as db:
            row = db.execute(
                "SELECT id FROM jobs AS j WHERE state IN ('pending', 'failed')"
                " AND not_before <= ? AND NOT EXISTS (SELECT 1 FROM jobs AS r"
                " WHERE r.key = j.key AND r.state = 'running')"
                " ORDER BY not_before, id LIMIT 1",
                (stamp,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', claim = ?, attempts = attempts + 1,"
                " updated = ? WHERE id = ?",
                (token, stamp, row[0]),
            )
        return self.get(int(row[0]))

    def complete(self, job: Job, result: str, *, seconds: float) -> bool:
        """Mark the claimed job done; False when the claim is no longer its own."""
        return self._finish(job, "done", seconds=seconds, result=result, error=None)

    def fail(self, job: Job, error: str, *, seconds: float, permanent: bool = False) -> State:
        """Record a failed attempt: ``failed`` with a backoff, or ``parked`` when the
        error is permanent or the attempts are used up. Returns the new state."""
        state: State = "parked" if permanent or job.attempts >= self.retry.limit else "failed"
        delay = 0.0 if state == "parked" else self.retry.delay(job.attempts)
        self._finish(job, state, seconds=seconds, error=error, result=None, delay=delay)
        return state

    def _finish(
        self,
        job: Job,
        state: State,
        *,
        seconds: float,
        result: str | None,
        error: str | None,
        delay: float = 0.0,
    ) -> bool:
        stamp = time.time()
        with self._transaction(durable=False) as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET state = ?, claim = NULL, result = ?, error = ?, seconds = ?,"
                    " not_before = ?, updated = ? WHERE id = ? AND state = 'running'"
                    " AND claim = ?",
                    (state, result, error, seconds, stamp + delay, stamp, job.id, job.claim),
                ).rowcount
            )

    def prune(self, *, keep_seconds: float, now: float | None = None) -> tuple[int, int]:
        """Forget what is older than ``keep_seconds``: jobs done that long ago, then the
        deliveries older than that with no job of their own left (a delivery that joined
        another's job never had one). Failed, parked, pending and running jobs stay
        whatever their age (someone has to look at them), and so do the deliveries that
        made them. Returns (jobs, deliveries) removed.

        Safe for the delivery ids' role against replays as long as ``keep_seconds`` is
        longer than the signature's timestamp window (a delivery older than that is
        refused before its id is looked up) and than reconciliation's memory of recent
        jobs (:data:`packager.webhook.reconcile.RECENT`): :data:`MIN_KEEP_SECONDS`."""
        if not keep_seconds >= MIN_KEEP_SECONDS:  # NaN too
            raise UsageError(
                f"deliveries must be kept at least {MIN_KEEP_SECONDS / 86400:g} day(s)",
                hint="a shorter log would forget deliveries MLflow may still resend",
            )
        cutoff = (time.time() if now is None else now) - keep_seconds
        with self._transaction(durable=False) as db:
            jobs = db.execute(
                "DELETE FROM jobs WHERE state = 'done' AND updated < ?", (cutoff,)
            ).rowcount
            deliveries = db.execute(
                "DELETE FROM deliveries WHERE received < ? AND NOT EXISTS"
                " (SELECT 1 FROM jobs WHERE jobs.delivery_id = deliveries.delivery_id)",
                (cutoff,),
            ).rowcount
        return jobs, deliveries

    def retry_job(self, job_id: int) -> Job:
        """Requeue a failed or parked job now, with its attempts reset."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, not_before = 0, updated = ?"
                " WHERE id = ? AND state IN ('failed', 'parked')",
                (time.time(), job_id),
            ).rowcount
        if not changed:
            raise UsageError(
                f"job {job_id} is not failed or parked, so there is nothing to retry",
                hint="`packager webhook jobs` lists the jobs and their states",
            )
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UsageError(f"there is no job {job_id} in {self.path}")
        return _job(row)

    def jobs(self, state: State | None = None) -> tuple[Job, ...]:
        where, args = (" WHERE state = ?", (state,)) if state else ("", ())
        with self._lock:
            rows = self._db.execute(f"{_SELECT}{where} ORDER BY id", args).fetchall()
        return tuple(_job(row) for row in rows)

    def counts(self) -> dict[State, int]:
        """Jobs by state (every state present, zero when none), for ``/metrics``."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {str(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in STATES}

    def deliveries(self) -> dict[str, int]:
        """Deliveries by outcome (queued, ignored)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT outcome, COUNT(*) FROM deliveries GROUP BY outcome"
            ).fetchall()
        return {str(outcome): int(n) for outcome, n in rows}

    def ping(self) -> None:
        """Raise if the database cannot be read (``/readyz``)."""
        with self._lock:
            self._db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()


_SELECT = (
    "SELECT id, delivery_id, spec, state, attempts, not_before, claim, error, result,"
    " created, updated, seconds FROM jobs"
)


def _job(row: tuple[object, ...]) -> Job:
    (job_id, delivery, spec, state, attempts, not_before, claim, error, result, *times) = row
    created, updated, seconds = times
    return Job(
        id=int(str(job_id)),
        delivery_id=str(delivery),
        spec=JobSpec.from_json(json.loads(str(spec))),
        state=state,  # type: ignore[arg-type]
        attempts=int(str(attempts)),
        not_before=float(str(not_before)),
        claim=None if claim is None else str(claim),
        error=None if error is None else str(error),
        result=None if result is None else str(result),
        created=float(str(created)),
        updated=float(str(updated)),
        seconds=None if seconds is None else float(str(seconds)),
    )
