"""The real release function: a job's rule choices become ``release_model``'s options."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from packager import release
from packager.source import RegistryOptions
from packager.webhook.queue import JobQueue
from packager.webhook.reconcile import VersionView, plan
from packager.webhook.rules import (
    ALIAS_CREATED,
    TAG_SET,
    VERSION_CREATED,
    Event,
    JobSpec,
    ReleaseChoices,
    parse_rules,
)
from packager.webhook.worker import WorkerPool, alias_check, release_function


def test_release_function_passes_the_rule_choices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, release.ReleaseOptions, object, object]] = []

    def fake_release_model(
        reference: str,
        options: release.ReleaseOptions,
        *,
        registry: RegistryOptions | None = None,
        cache_root: Path | None = None,
    ) -> SimpleNamespace:
        seen.append((reference, options, registry, cache_root))
        return SimpleNamespace(status="already released", image="r.example/x/m@sha256:ab")

    monkeypatch.setattr(release, "release_model", fake_release_model)
    registry = RegistryOptions(tracking_uri="http://127.0.0.1:1")
    run = release_function(registry, tmp_path)
    spec = JobSpec(
        model="models:/m/3",
        name="m",
        version="3",
        image="r.example/x/m:3",
        event=ALIAS_CREATED,
        rule_line=2,
        release=ReleaseChoices(test=False, backend="docker", alias="live", attestations=False),
    )
    assert run(spec) == "already released: r.example/x/m@sha256:ab"
    [(reference, options, got_registry, got_root)] = seen
    assert reference == "models:/m/3"
    assert options == release.ReleaseOptions(
        tags=("r.example/x/m:3",),
        backend="docker",
        test=False,
        alias="live",
        force=False,
        attestations=False,
    )
    assert (got_registry, got_root) == (registry, tmp_path)


ALIAS_RULES = """\
rules:
  - models: "fraud"
    aliases: [champion]
    image: "r.example/x/{name}:{version}"
    release: {alias: live}
  - models: "churn"
    image: "r.example/x/{name}:{version}"
    release: {alias: live}
  - models: "scored"
    tags: [deploy]
    image: "r.example/x/{name}:{version}"
    release: {alias: live}
"""


class Registry:
    """Versions and aliases by model, as the alias check reads them."""

    def __init__(self, versions: dict[str, list[str]], aliases: dict[str, dict[str, str]]) -> None:
        self.data = versions
        self.aliases = aliases

    def model_names(self) -> Sequence[str]:
        return list(self.data)

    def by_alias(self, name: str, alias: str) -> VersionView | None:
        version = self.aliases.get(name, {}).get(alias)
        return None if version is None else VersionView(name=name, version=version, tags={})

    def versions(self, name: str) -> Sequence[VersionView]:
        return [VersionView(name=name, version=v, tags={}) for v in self.data.get(name, [])]

    def version(self, name: str, version: str) -> VersionView | None:
        found = version in self.data.get(name, [])
        return VersionView(name=name, version=version, tags={}) if found else None


def _run_jobs(tmp_path: Path, registry: Registry, jobs: tuple[JobSpec, ...]) -> list[JobSpec]:
    """Run ``jobs`` through a pool with the alias check; the specs the release got."""
    seen: list[JobSpec] = []

    def fake_release(spec: JobSpec) -> str:
        seen.append(spec)
        return "released"

    queue = JobQueue(tmp_path / "queue.db")
    try:
        queue.accept("d-1", "test", jobs)
        pool = WorkerPool(queue, fake_release, alias_check=alias_check(lambda: registry))
        while (job := queue.claim()) is not None:
            pool.run_one(job)
        assert {job.state for job in queue.jobs()} == {"done"}
    finally:
        queue.close()
    return seen


def test_a_late_job_does_not_move_the_rule_alias_back(tmp_path: Path) -> None:
    rules = parse_rules(ALIAS_RULES)
    fraud3 = rules.plan(Event(kind=ALIAS_CREATED, name="fraud", version="3", alias="champion"))
    fraud4 = rules.plan(Event(kind=ALIAS_CREATED, name="fraud", version="4", alias="champion"))
    churn3 = rules.plan(Event(kind=VERSION_CREATED, name="churn", version="3"))
    churn4 = rules.plan(Event(kind=VERSION_CREATED, name="churn", version="4"))
    scored3 = rules.plan(Event(kind=TAG_SET, name="scored", version="3", tag_key="deploy"))
    scored5 = rules.plan(Event(kind=TAG_SET, name="scored", version="5", tag_key="deploy"))
    registry = Registry(
        {"fraud": ["3", "4"], "churn": ["3", "4"], "scored": ["3", "4", "5"]},
        {"fraud": {"champion": "4"}, "scored": {"live": "4"}},
    )
    jobs = (*fraud3, *fraud4, *churn3, *churn4, *scored3, *scored5)
    seen = _run_jobs(tmp_path, registry, jobs)
    moved = {spec.model: spec.release.alias for spec in seen}
    assert moved == {
        "models:/fraud/3": None,  # champion has moved on to 4
        "models:/fraud/4": "live",
        "models:/churn/3": None,  # version 4 exists
        "models:/churn/4": "live",
        "models:/scored/3": None,  # live already at the newer 4
        "models:/scored/5": "live",
    }


def test_a_rolled_back_trigger_alias_is_followed(tmp_path: Path) -> None:
    """champion moved back to 3 by hand: the job for 3 moves live back too."""
    [job] = parse_rules(ALIAS_RULES).plan(
        Event(kind=ALIAS_CREATED, name="fraud", version="3", alias="champion")
    )
    registry = Registry({"fraud": ["3", "4"]}, {"fraud": {"champion": "3", "live": "4"}})
    [spec] = _run_jobs(tmp_path, registry, (job,))
    assert spec.release.alias == "live"


def test_reconciled_jobs_carry_their_trigger(tmp_path: Path) -> None:
    rules = parse_rules(ALIAS_RULES)
    registry = Registry({"fraud": ["3"], "churn": ["2"]}, {"fraud": {"champion": "3"}})
    jobs = {found.job.name: found.job for found in plan(rules, registry)}
    assert (jobs["fraud"].trigger_alias, jobs["fraud"].newest_only) == ("champion", False)
    assert (jobs["churn"].trigger_alias, jobs["churn"].newest_only) == (None, True)
