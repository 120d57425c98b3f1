"""Reconciliation: what the rules cover, read from a fake registry, queued when unreleased."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from packager import __version__
from packager.errors import LockError, RegistryUnreachableError
from packager.record import BASE_DIGEST_TAG, IMAGE_TAG, LOCK_DIGEST_TAG, VERSION_TAG
from packager.webhook.queue import JobQueue
from packager.webhook.reconcile import RECENT, RECONCILE, VersionView, plan, reconcile
from packager.webhook.rules import JobSpec, parse_rules, reference_part
from packager.webhook.service import Reconciler

RULES = """\
rules:
  - models: "fraud-*"
    aliases: [champion, challenger]
    image: "reg.example:5000/serving/{name}:{version}"
  - models: "churn"
    image: "reg.example:5000/batch/{name}:{version}"
  - models: "*"
    tags: {deploy: "true"}
    image: "reg.example:5000/tagged/{name}:{version}"
"""


def released(repository: str, *, packager: str = __version__) -> dict[str, str]:
    return {
        IMAGE_TAG: f"{repository}@sha256:{'a' * 64}",
        LOCK_DIGEST_TAG: "sha256:" + "b" * 64,
        VERSION_TAG: packager,
    }


class FakeRegistry:
    """Versions by model, aliases by model; counts whole-version fetches."""

    def __init__(
        self,
        versions: Mapping[str, Mapping[str, Mapping[str, str]]],
        aliases: Mapping[str, Mapping[str, str]],
    ) -> None:
        self.data = {name: dict(found) for name, found in versions.items()}
        self.aliases = aliases

    def model_names(self) -> Sequence[str]:
        return list(self.data)

    def by_alias(self, name: str, alias: str) -> VersionView | None:
        version = self.aliases.get(name, {}).get(alias)
        return None if version is None else self.version(name, version)

    def versions(self, name: str) -> Sequence[VersionView]:
        return [VersionView(name=name, version=v, tags=t) for v, t in self.data[name].items()]

    def version(self, name: str, version: str) -> VersionView | None:
        tags = self.data.get(name, {}).get(version)
        return None if tags is None else VersionView(name=name, version=version, tags=tags)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    q = JobQueue(tmp_path / "queue.db")
    yield q
    q.close()


def registry() -> FakeRegistry:
    return FakeRegistry(
        versions={
            "fraud-a": {
                "1": released("reg.example:5000/serving/fraud-a"),  # current: nothing to do
                "2": {},  # @challenger, never released
                "3": {},  # no alias, no rule covers it
            },
            "fraud-b": {"4": released("reg.example:5000/serving/fraud-b", packager="0.0.1")},
            "fraud-c": {"1": released("elsewhere.example/fraud-c")},  # another repository
            "churn": {"1": {}, "2": {}, "10": released("reg.example:5000/batch/churn")},
            "other": {"1": {"deploy": "true"}, "2": {"deploy": "false"}},
        },
        aliases={
            "fraud-a": {"champion": "1", "challenger": "2"},
            "fraud-b": {"champion": "4"},
            "fraud-c": {"champion": "1"},
        },
    )


def test_plan_queues_missing_and_stale_versions_the_rules_cover() -> None:
    found = plan(parse_rules(RULES), registry())
    jobs = [f.job for f in found]
    assert [(j.model, j.image) for j in jobs] == [
        ("models:/fraud-a/2", "reg.example:5000/serving/fraud-a:2"),
        ("models:/fraud-b/4", "reg.example:5000/serving/fraud-b:4"),  # older packager
        ("models:/fraud-c/1", "reg.example:5000/serving/fraud-c:1"),  # other repository
        ("models:/other/1", "reg.example:5000/tagged/other:1"),
    ]
    assert [f.reason for f in found] == [
        "has no recorded image (no event seen for it)",
        f"was released by packager 0.0.1, this is {__version__}",
        "was released to elsewhere.example/fraud-c, the rule says reg.example:5000/serving/fraud-c",
        "has no recorded image (no event seen for it)",
    ]
    # churn's newest version (10, not "2" by string order) is released: nothing for it.
    assert all(j.event == RECONCILE for j in jobs)
    assert jobs[0].rule_line == 2


def test_newest_version_is_queued_when_unreleased() -> None:
    fake = FakeRegistry(versions={"churn": {"9": {}, "10": {}}}, aliases={})
    (found,) = plan(parse_rules(RULES), fake)
    assert found.job.model == "models:/churn/10"


def test_reconcile_queues_once_and_not_what_the_queue_holds(queue: JobQueue) -> None:
    rules = parse_rules(RULES)
    fake = registry()
    ids = reconcile(rules, fake, queue)
    assert len(ids) == 4
    assert reconcile(rules, fake, queue) == ()  # still pending: not queued again
    job = queue.claim()
    assert job is not None
    assert reconcile(rules, fake, queue) == ()  # running: not queued again
    queue.complete(job, "dispatched", seconds=1.0)
    # Done but the registry still says unreleased (the fake records nothing; with
    # --dispatch the cluster may not have run it yet): not queued again within the hour,
    assert reconcile(rules, fake, queue) == ()
    # and queued again after it, since only the registry's tags say a version is released.
    assert len(reconcile(rules, fake, queue, now=time.time() + RECENT + 1)) == 1
    assert queue.deliveries() == {"queued": 2}


def test_reconcile_queues_nothing_when_all_is_released(queue: JobQueue) -> None:
    fake = FakeRegistry(
        versions={"fraud-a": {"1": released("reg.example:5000/serving/fraud-a")}},
        aliases={"fraud-a": {"champion": "1"}},
    )
    assert reconcile(parse_rules(RULES), fake, queue) == ()
    assert queue.deliveries() == {}  # no delivery row per idle round


def test_reconciler_survives_an_unreachable_registry(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    def unreachable() -> FakeRegistry:
        raise RegistryUnreachableError("http://mlflow.invalid is not reachable")

    woken: list[bool] = []
    reconciler = Reconciler(parse_rules(RULES), unreachable, queue, lambda: woken.append(True), 60)
    with caplog.at_level(logging.WARNING):
        assert reconciler.run_once() == ()
    assert "reconciliation failed" in caplog.text
    assert not woken
    ok = Reconciler(parse_rules(RULES), registry, queue, lambda: woken.append(True), 60)
    assert len(ok.run_once()) == 4
    assert woken == [True]


def test_reconciled_images_use_a_reference_fit_name() -> None:
    registry = FakeRegistry({"Fraud Model": {"3": {"deploy": "true"}}}, {})
    [found] = plan(parse_rules(RULES), registry)
    job = found.job
    # The same name as a delivery would give (the hash of "Fraud Model" keeps it apart
    # from a model named "fraud-model").
    assert (job.model, job.image) == (
        "models:/Fraud Model/3",
        f"reg.example:5000/tagged/{reference_part('Fraud Model')}:3",
    )
    assert job.image.startswith("reg.example:5000/tagged/fraud-model-")


def test_reconciler_survives_a_bug_and_readiness_sees_it_end(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> FakeRegistry:
        raise RuntimeError("a bug in a look-up")

    reconciler = Reconciler(parse_rules(RULES), broken, queue, lambda: None, 0.01)
    with caplog.at_level(logging.ERROR):
        assert reconciler.run_once() == ()
    assert "reconciliation failed" in caplog.text
    reconciler.start()
    try:
        time.sleep(0.05)  # a few rounds, each failing
        assert reconciler.alive()
    finally:
        reconciler.stop()
    reconciler._thread.join(5)
    assert reconciler.alive()  # stopped as asked: not a death


def recorded_recipe(lock: str = "b", base: str = "c") -> dict[str, str]:
    """Recipe tags with the lock and base digests made of one repeated hex digit."""
    return {
        LOCK_DIGEST_TAG: "sha256:" + lock * 64,
        BASE_DIGEST_TAG: "sha256:" + base * 64,
        VERSION_TAG: __version__,
    }


def test_a_changed_lock_or_base_makes_a_released_version_stale(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    rules = parse_rules(RULES)
    current = {**released("reg.example:5000/serving/fraud-a"), **recorded_recipe()}
    fake = FakeRegistry(
        versions={"fraud-a": {"1": current, "2": current, "3": current}},
        aliases={"fraud-a": {"champion": "1", "challenger": "2"}},
    )
    asked: list[str] = []

    def recipe(job: JobSpec) -> Mapping[str, str]:
        asked.append(job.model)
        if job.version == "2":
            return recorded_recipe(lock="d")
        return recorded_recipe()

    [found] = plan(rules, fake, recipe)
    assert found.job.model == "models:/fraud-a/2"
    assert found.reason == (
        "was built from another recipe "
        f"(packager.lock_digest sha256:{'b' * 64} -> sha256:{'d' * 64})"
    )
    assert asked == ["models:/fraud-a/1", "models:/fraud-a/2"]  # only what rules cover
    # Without the recipe, the tags alone say both are current.
    assert plan(rules, fake) == ()
    # A base rebuilt since: stale too, and reconcile logs why.
    asked.clear()

    def rebased(job: JobSpec) -> Mapping[str, str]:
        return recorded_recipe(base="e")

    with caplog.at_level(logging.WARNING):
        assert len(reconcile(rules, fake, queue, recipe=rebased)) == 2
    assert "packager.base_digest sha256:" + "c" * 64 in caplog.text
    # Held by the queue: not queued again, and not even looked at (no lock, no base).
    assert reconcile(rules, fake, queue, recipe=recipe) == ()
    assert asked == []


def test_a_recipe_that_cannot_be_computed_now_queues_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    current = {**released("reg.example:5000/serving/fraud-a"), **recorded_recipe()}
    fake = FakeRegistry(
        versions={"fraud-a": {"1": current}}, aliases={"fraud-a": {"champion": "1"}}
    )

    def offline(job: JobSpec) -> Mapping[str, str]:
        raise LockError("https://pypi.org/simple is not reachable")

    with caplog.at_level(logging.WARNING):
        assert plan(parse_rules(RULES), fake, offline) == ()
    assert "cannot tell whether models:/fraud-a/1's image is current" in caplog.text
    assert "pypi.org/simple is not reachable" in caplog.text
