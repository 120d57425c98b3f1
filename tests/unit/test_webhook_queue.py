"""The durable queue: what was accepted survives SIGKILL and completes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager.errors import CacheError, UsageError
from packager.webhook.queue import JobQueue, RetryPolicy
from packager.webhook.rules import VERSION_CREATED, JobSpec, ReleaseChoices

ROOT = Path(__file__).resolve().parents[2]


def spec(version: str = "1") -> JobSpec:
    return JobSpec(
        model=f"models:/m/{version}",
        name="m",
        version=version,
        image=f"r.example/x/m:{version}",
        event=VERSION_CREATED,
        rule_line=2,
        release=ReleaseChoices(),
    )


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    q = JobQueue(tmp_path / "queue.db", retry=RetryPolicy(limit=3, base=10, cap=15))
    yield q
    q.close()


def _killed_child(db: Path, steps: str) -> None:
    """Run ``steps`` in a fresh interpreter with ``q`` open on ``db``; once it prints
    READY, SIGKILL it (no clean-up, no close) and wait for it to be gone."""
    code = (
        textwrap.dedent(
            f"""
        import sys, time
        from pathlib import Path
        from packager.webhook.queue import JobQueue
        from packager.webhook.rules import JobSpec, ReleaseChoices
        q = JobQueue(Path({str(db)!r}))
        spec = JobSpec(model="models:/m/1", name="m", version="1", image="r.example/x/m:1",
                       event="model_version.created", rule_line=2, release=ReleaseChoices())
        """
        )
        + textwrap.dedent(steps)
        + "\nprint('READY', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL


def test_accepted_then_killed_is_pending_and_runs_once(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    _killed_child(db, "assert q.accept('d-1', 'model_version.created', (spec,)).job_ids == (1,)")
    q = JobQueue(db)
    try:
        assert q.recover() == 0
        assert [(j.id, j.state, j.spec) for j in q.jobs()] == [(1, "pending", spec())]
        assert q.accept("d-1", VERSION_CREATED, (spec(),)).duplicate  # MLflow's retry
        job = q.claim()
        assert job is not None
        assert q.complete(job, "released", seconds=1.0)
        assert q.claim() is None
        assert [(j.state, j.attempts, j.result) for j in q.jobs()] == [("done", 1, "released")]
    finally:
        q.close()


def test_killed_while_running_is_resumed_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    _killed_child(
        db,
        """
        q.accept('d-1', 'model_version.created', (spec,))
        assert q.claim().state == 'running'
        """,
    )
    q = JobQueue(db)  # the dead child's lock is gone with it
    try:
        assert q.jobs()[0].state == "running"
        assert q.recover() == 1
        recovered = q.get(1)
        assert (recovered.state, recovered.attempts) == ("failed", 1)  # the attempt counts
        assert q.claim(now=recovered.not_before - 1) is None  # waits out its backoff
        first = q.claim(now=recovered.not_before)
        assert first is not None
        assert (first.state, first.attempts) == ("running", 2)
        assert q.claim() is None  # one job, one runner
        assert q.complete(first, "already released", seconds=0.1)
        assert not q.complete(first, "again", seconds=0.1)  # done once
        assert q.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 0, "parked": 0}
    finally:
        q.close()


def test_a_second_owner_is_refused(queue: JobQueue) -> None:
    with pytest.raises(UsageError, match="another receiver"):
        JobQueue(queue.path)


def test_duplicate_delivery_and_pending_twin_queue_nothing(queue: JobQueue) -> None:
    first = queue.accept("d-1", VERSION_CREATED, (spec("1"),))
    assert (first.duplicate, first.job_ids) == (False, (1,))
    assert queue.accept("d-1", VERSION_CREATED, (spec("1"),)).duplicate
    # Another delivery for the same release while the first is still pending joins it.
    assert queue.accept("d-2", "model_version_alias.created", (spec("1"),)).job_ids == (1,)
    assert queue.accept("d-3", VERSION_CREATED, ()).job_ids == ()
    assert len(queue.jobs()) == 1
    assert queue.deliveries() == {"queued": 2, "ignored": 1}


def test_failures_back_off_then_park_and_retry_requeues(queue: JobQueue) -> None:
    queue.accept("d-1", VERSION_CREATED, (spec(),))
    job = queue.claim(now=0)
    assert job is not None
    assert queue.fail(job, "registry down", seconds=1) == "failed"
    failed = queue.get(job.id)
    assert failed.error == "registry down"
    assert queue.claim(now=failed.not_before - 1) is None  # backoff of 10 s
    job = queue.claim(now=failed.not_before)
    assert job is not None
    assert job.attempts == 2
    assert queue.fail(job, "registry down", seconds=1) == "failed"
    assert queue.get(job.id).not_before - queue.get(job.id).updated == pytest.approx(15)  # cap
    job = queue.claim(now=queue.get(job.id).not_before)
    assert job is not None
    assert queue.fail(job, "registry down", seconds=1) == "parked"  # limit 3
    assert queue.claim(now=1e12) is None
    assert queue.retry_job(job.id).state == "pending"
    assert queue.claim() is not None
    with pytest.raises(UsageError, match="not failed or parked"):
        queue.retry_job(job.id)


def test_permanent_failure_parks_at_once(queue: JobQueue) -> None:
    queue.accept("d-1", VERSION_CREATED, (spec(),))
    job = queue.claim()
    assert job is not None
    assert queue.fail(job, "bad image reference", seconds=0, permanent=True) == "parked"


def test_a_job_interrupted_at_the_attempt_limit_is_parked(queue: JobQueue) -> None:
    """A release that kills the receiver (out of memory) must not restart it forever."""
    queue.accept("d-1", VERSION_CREATED, (spec(),))
    for _ in range(3):  # limit 3: claimed, then the process "dies" each time
        job = queue.claim(now=1e12)
        assert job is not None
        assert queue.recover(now=0) == 1
    parked = queue.get(1)
    assert (parked.state, parked.attempts) == ("parked", 3)
    assert "after 3 attempt(s), the last interrupted" in str(parked.error)
    assert queue.claim(now=1e13) is None


def test_a_twin_of_a_failed_job_joins_it_and_ends_its_backoff(queue: JobQueue) -> None:
    queue.accept("d-1", VERSION_CREATED, (spec(),))
    job = queue.claim(now=0)
    assert job is not None
    assert queue.fail(job, "registry down", seconds=1) == "failed"
    assert queue.claim(now=1) is None  # waiting out its backoff
    assert queue.accept("d-2", VERSION_CREATED, (spec(),)).job_ids == (1,)
    again = queue.claim(now=1)
    assert again is not None
    assert (again.id, again.attempts) == (1, 2)
    assert len(queue.jobs()) == 1


def test_a_twin_of_a_running_job_waits_for_it(queue: JobQueue) -> None:
    queue.accept("d-1", VERSION_CREATED, (spec("1"),))
    running = queue.claim()
    assert running is not None
    assert queue.accept("d-2", VERSION_CREATED, (spec("1"), spec("2"))).job_ids == (2, 3)
    other = queue.claim()
    assert other is not None
    assert other.spec.version == "2"  # the twin of the running job is held back
    assert queue.claim() is None
    assert queue.complete(running, "released", seconds=1)
    twin = queue.claim()
    assert twin is not None
    assert twin.id == 2


def test_prune_forgets_old_done_jobs_and_their_deliveries_only(queue: JobQueue) -> None:
    day = 86400.0
    queue.accept("d-done", VERSION_CREATED, (spec("1"),))
    queue.accept("d-parked", VERSION_CREATED, (spec("2"),))
    queue.accept("d-pending", VERSION_CREATED, (spec("3"),))
    queue.accept("d-ignored", VERSION_CREATED, ())
    done = queue.claim()
    assert done is not None
    assert queue.complete(done, "released", seconds=1)
    parked = queue.claim()
    assert parked is not None
    queue.fail(parked, "bad image reference", seconds=0, permanent=True)
    # A day later: nothing is old enough yet for a 30-day log.
    assert queue.prune(keep_seconds=30 * day, now=time.time() + day) == (0, 0)
    # 31 days later: the done job, its delivery and the ignored delivery go; the parked
    # and the pending job, and their deliveries, stay.
    assert queue.prune(keep_seconds=30 * day, now=time.time() + 31 * day) == (1, 2)
    assert sorted(job.state for job in queue.jobs()) == ["parked", "pending"]
    assert queue.deliveries() == {"queued": 2}
    # A pruned delivery id is new again (its signature's timestamp is long refused).
    assert queue.accept("d-done", VERSION_CREATED, ()).duplicate is False
    with pytest.raises(UsageError, match="at least 1 day"):
        queue.prune(keep_seconds=3600)


def test_the_receiver_refuses_a_log_shorter_than_a_day(tmp_path: Path) -> None:
    from packager.webhook.rules import Rules
    from packager.webhook.service import ServeOptions

    options = ServeOptions(
        rules=Rules(rules=(), source="rules.yaml"),
        secret="s",  # noqa: S106 - a test secret
        queue=tmp_path / "q.db",
        keep_days=0.5,
    )
    with pytest.raises(UsageError, match=r"--keep-days 0\.5: at least 1"):
        options.check()


def test_concurrent_deliveries_share_commits_and_each_is_queued_once(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit under 20 threads: every delivery committed once, in fewer
    transactions than deliveries; a commit that fails hands its error to its own batch
    only, and nobody waits forever."""
    import threading

    commits: list[int] = []
    real_commit = queue._commit
    failing = {"d-3-7"}

    def counted(batch: list[Any]) -> None:
        commits.append(len(batch))
        if failing & {r.delivery_id for r in batch}:
            for request in batch:
                request.error = CacheError("disk full")
            return
        real_commit(batch)

    monkeypatch.setattr(queue, "_commit", counted)
    results: dict[str, object] = {}

    def client(n: int) -> None:
        for i in range(25):
            delivery = f"d-{n}-{i}"
            try:
                results[delivery] = queue.accept(delivery, VERSION_CREATED, (spec(delivery),))
            except CacheError as err:
                results[delivery] = err

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    failed = {d for d, r in results.items() if isinstance(r, CacheError)}
    assert "d-3-7" in failed
    assert len(results) == 500
    assert sum(commits) == 500  # each delivery in exactly one batch
    assert len(commits) < 500  # and batches were shared
    queued = {job.delivery_id for job in queue.jobs()}
    assert queued == set(results) - failed
