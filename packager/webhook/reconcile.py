"""Reconciliation: what the rules cover, read from the registry, queued when unreleased.

MLflow delivers an event a few times at most and never again (see the package's
docstring), so an event sent while the receiver was down, or dropped on the way, is gone.
The registry itself still says what should be released: on start and every
``--reconcile-interval`` the receiver lists the versions its rules cover and queues a
job for each whose recorded image is missing or stale:

- an alias rule covers the versions its aliases point at, in every model its globs match;
- a rule for every new version covers each matching model's newest version;
- a tag rule covers the versions that carry the tag (with the value, when it names one).

A version is stale when it has no ``packager.image`` tag, when that image is in another
repository than the rule's, when it was recorded by another packager version, or when the
recipe a release would record now differs from the recorded one: the lock (a requirement
now resolves to a newer release, or the lock options changed) or the base image's digest
(a rebuilt base, or another base for the model's Python). The last two need a lock and the
base, so they are computed (from the caches a release fills) only for versions that pass
the cheap checks, and only when the receiver releases here: a dispatching receiver builds
nothing, so it compares the first three and the dispatched release compares the rest. A
version whose recipe cannot be computed now (PyPI unreachable, say) is logged and left for
the next reconciliation, not rebuilt.
A job whose key is still in the queue (pending, running, retrying or parked), or completed
within the last :data:`RECENT` seconds, is not queued again, so reconciling often costs
only the registry look-ups. The second case is for ``--dispatch``: there a completed job
means a dispatched one, and the version's tags appear only when the cluster has run it.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from packager import __version__
from packager.errors import PackagerError
from packager.record import IMAGE_TAG, VERSION_TAG
from packager.webhook.queue import JobQueue
from packager.webhook.rules import JobSpec, Rule, Rules

log = logging.getLogger(__name__)

# The recipe tags a release of the job would record now (packager.record's names).
RecipeFn = Callable[[JobSpec], Mapping[str, str]]

RECONCILE = "reconcile"
RECENT = 3600.0


@dataclass(frozen=True, kw_only=True)
class VersionView:
    """A registered model version as reconciliation needs it."""

    name: str
    version: str
    tags: Mapping[str, str]


class RegistryView(Protocol):
    """The registry look-ups reconciliation makes (MLflow's client in use, a fake in tests)."""

    def model_names(self) -> Sequence[str]: ...

    def by_alias(self, name: str, alias: str) -> VersionView | None: ...

    def versions(self, name: str) -> Sequence[VersionView]: ...

    def version(self, name: str, version: str) -> VersionView | None: ...


@dataclass(frozen=True)
class Stale:
    """A covered version to release, and why."""

    job: JobSpec
    reason: str


def plan(
    rules: Rules,
    registry: RegistryView,
    recipe: RecipeFn | None = None,
    *,
    skip: Callable[[str], bool] = frozenset().__contains__,
) -> tuple[Stale, ...]:
    """The jobs that would release every covered version that is missing or stale.
    ``recipe``, when given, also compares the lock and base a release would use now;
    ``skip`` leaves out job keys before that comparison (those the queue holds)."""
    names = registry.model_names()
    found: dict[str, Stale] = {}
    checked: set[str] = set()
    for rule in rules.rules:
        for name in sorted(n for n in names if _matches(rule, n)):
            for version, alias in _covered(rule, name, registry):
                job = _job(rule, version, alias)
                if job.key in checked or skip(job.key):
                    continue
                checked.add(job.key)
                reason = _stale(version, job.image)
                if reason is None and recipe is not None:
                    reason = _recipe_changed(version, job, recipe)
                if reason is not None:
                    found[job.key] = Stale(job, reason)
    return tuple(found.values())


def reconcile(
    rules: Rules,
    registry: RegistryView,
    queue: JobQueue,
    *,
    recipe: RecipeFn | None = None,
    now: float | None = None,
) -> tuple[int, ...]:
    """Queue what :func:`plan` finds, less what the queue holds or recently completed;
    the job ids."""
    stamp = time.time() if now is None else now
    active = queue.active_keys(done_since=stamp - RECENT)
    stale = plan(rules, registry, recipe, skip=active.__contains__)
    if not stale:
        log.info("reconciliation: every covered version is released")
        return ()
    accepted = queue.accept(f"{RECONCILE}-{uuid.uuid4()}", RECONCILE, tuple(s.job for s in stale))
    for found in stale:
        log.warning("reconciliation: %s %s; queued", found.job.model, found.reason)
    return accepted.job_ids


def _matches(rule: Rule, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in rule.models)


def _covered(rule: Rule, name: str, registry: RegistryView) -> list[tuple[VersionView, str | None]]:
    if rule.aliases is not None:
        found = [(registry.by_alias(name, alias), alias) for alias in rule.aliases]
        return [(version, alias) for version, alias in found if version is not None]
    versions = registry.versions(name)
    if rule.tags is None:
        newest = max(versions, key=lambda v: int(v.version), default=None)
        # Fetched whole: search results may lack tags (they do on some servers).
        whole = None if newest is None else registry.version(name, newest.version)
        return [] if whole is None else [(whole, None)]
    return [(v, None) for v in versions if _tagged(rule.tags, v.tags)]


def _tagged(wanted: Mapping[str, str | None], tags: Mapping[str, str]) -> bool:
    return any(
        key in tags and (value is None or tags[key] == value) for key, value in wanted.items()
    )


def _job(rule: Rule, version: VersionView, alias: str | None) -> JobSpec:
    return JobSpec(
        model=f"models:/{version.name}/{version.version}",
        name=version.name,
        version=version.version,
        image=rule.image_for(version.name, version.version, alias),
        event=RECONCILE,
        rule_line=rule.line,
        release=rule.release,
        trigger_alias=alias,
        newest_only=rule.aliases is None and rule.tags is None,
    )


def _stale(version: VersionView, image: str) -> str | None:
    """Why the recorded image is not current, from the tags alone (None: it may be)."""
    recorded = version.tags.get(IMAGE_TAG, "")
    if not recorded:
        return "has no recorded image (no event seen for it)"
    packager = version.tags.get(VERSION_TAG)
    if packager != __version__:
        return f"was released by packager {packager or 'unknown'}, this is {__version__}"
    if recorded.split("@", 1)[0] != _repository(image):
        return f"was released to {recorded.split('@', 1)[0]}, the rule says {_repository(image)}"
    return None


def _recipe_changed(version: VersionView, job: JobSpec, recipe: RecipeFn) -> str | None:
    """Which recorded recipe tag differs from what a release would record now."""
    try:
        now = recipe(job)
    except PackagerError as err:
        log.warning(
            "reconciliation: cannot tell whether %s's image is current (%s); "
            "left for the next reconciliation",
            job.model,
            err.message,
        )
        return None
    changed = sorted(key for key, value in now.items() if version.tags.get(key) != value)
    if not changed:
        return None
    return (
        "was built from another recipe ("
        + ", ".join(
            f"{key} {version.tags.get(key) or 'unrecorded'} -> {now[key]}" for key in changed
        )
        + ")"
    )


def _repository(image: str) -> str:
    """``host/repo`` of ``host/repo[:tag]`` (a port's colon is not a tag's)."""
    name, _, tag = image.rpartition(":")
    return image if not name or "/" in tag else name
