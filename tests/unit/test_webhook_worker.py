"""The real release function: a job's rule choices become ``release_model``'s options."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from packager import release
from packager.source import RegistryOptions
from packager.webhook.rules import ALIAS_CREATED, JobSpec, ReleaseChoices
from packager.webhook.worker import release_function


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
