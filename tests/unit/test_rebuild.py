"""``packager rebuild`` refuses, before building, a recipe whose inputs moved: the model
version's files or the base's digest. (The rebuild itself is tested end to end in
tests/image/test_release_rebuild.py.)"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from packager import attest, publish, rebuild
from packager.errors import RebuildError
from packager.image import bases
from packager.source import Provenance
from tests.unit.test_attest import DIGEST, with_lock

IMAGE = "127.0.0.1:5000/wine@" + DIGEST


def _fetched(statement: bytes) -> Any:
    return publish.FetchedAttestations(
        image=IMAGE, labels={}, documents={"att": statement}, references={}
    )


@pytest.fixture
def provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    statement = attest.provenance_statement(with_lock())
    monkeypatch.setattr(publish, "fetch_attestations", lambda *_a, **_k: _fetched(statement))


class _Sourced:
    def __init__(self, digest: str) -> None:
        self.provenance = Provenance(
            reference="models:/wine/3",
            reached_through="version",  # type: ignore[arg-type]
            model_name="wine",
            model_version="3",
            content_digest=digest,
        )


@pytest.mark.usefixtures("provenance")
def test_a_model_version_whose_files_changed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    changed = "sha256:" + "e" * 64
    monkeypatch.setattr(rebuild, "fetch_model", lambda *_a, **_k: _Sourced(changed))
    with pytest.raises(RebuildError, match=f"models:/wine/3 now holds other files \\({changed}"):
        rebuild.rebuild(IMAGE)


@pytest.mark.usefixtures("provenance")
def test_a_base_that_moved_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    same = with_lock().provenance.content_digest
    monkeypatch.setattr(rebuild, "fetch_model", lambda *_a, **_k: _Sourced(same))

    class _Base:
        digest = "sha256:" + "7" * 64

    monkeypatch.setattr(bases, "load_base", lambda *_a, **_k: _Base())
    with pytest.raises(RebuildError, match=r"is sha256:7{64}, the release used sha256:2{64}"):
        rebuild.rebuild(IMAGE)


def test_a_provenance_about_another_image_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    statement = attest.provenance_statement(replace(with_lock(), digest="sha256:" + "a" * 64))
    monkeypatch.setattr(publish, "fetch_attestations", lambda *_a, **_k: _fetched(statement))
    with pytest.raises(RebuildError, match=r"is about sha256:a{64}"):
        rebuild.rebuild(IMAGE)


def test_a_docker_backend_image_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    docker_built = replace(with_lock(), options=attest.BuildOptions(backend="docker"))
    statement = attest.provenance_statement(docker_built)
    monkeypatch.setattr(publish, "fetch_attestations", lambda *_a, **_k: _fetched(statement))
    with pytest.raises(RebuildError, match="built with the docker backend"):
        rebuild.rebuild(IMAGE)


@pytest.mark.usefixtures("provenance")
def test_the_base_is_loaded_for_the_lock_s_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    same = with_lock().provenance.content_digest
    monkeypatch.setattr(rebuild, "fetch_model", lambda *_a, **_k: _Sourced(same))
    asked: list[str] = []

    class _StopError(Exception):
        pass

    def load_base(*_a: object, platform: str = "linux/amd64", **_k: object) -> None:
        asked.append(platform)
        raise _StopError

    monkeypatch.setattr(bases, "load_base", load_base)
    with pytest.raises(_StopError):
        rebuild.rebuild(IMAGE)
    assert asked == ["linux/arm64"]  # the lock's target, not the default amd64
