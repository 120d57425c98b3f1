"""``packager release`` without an engine: its order of steps (with fakes for the build,
test and push), its tags, and the record step against a real SQLite model registry."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from packager import api, publish, record, release, verify
from packager.cli import main
from packager.deploy import inputs as deploy_inputs
from packager.deploy.inputs import ImageFacts
from packager.errors import ImageTestError, RecordError, UsageError
from packager.image import engine
from packager.source import Provenance, RegistryOptions

# -- tags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("127.0.0.1:5000/models", False),
        ("127.0.0.1:5000/models:3", True),
        ("registry.example.com/team/wine:v1", True),
        ("registry.example.com/team/wine", False),
    ],
)
def test_has_tag_ignores_the_port(reference: str, expected: bool) -> None:
    assert release.has_tag(reference) is expected


def test_a_repository_alone_is_tagged_with_the_version() -> None:
    version = record.VersionRef(name="Wine Model", version="7", tracking_uri="", registry_uri="")
    assert release._tag_for("127.0.0.1:5000/models", version) == (
        "127.0.0.1:5000/models:Wine_Model-7"
    )
    assert release._tag_for("127.0.0.1:5000/models:keep", version) == ("127.0.0.1:5000/models:keep")


def test_a_tag_without_a_registry_is_refused_before_anything_runs() -> None:
    options = release.ReleaseOptions(tags=("wine:3",))
    with pytest.raises(Exception, match="names no registry"):
        release.release_model("models:/wine/3", options)
    with pytest.raises(UsageError, match="needs a registry"):
        release.release_model("models:/wine/3", release.ReleaseOptions(tags=()))


def test_a_local_model_has_nowhere_to_record() -> None:
    provenance = Provenance(reference="./model", reached_through="local")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not a registered model version"):
        record.version_of(provenance, None)


def test_several_models_cannot_share_one_tag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["release", "models:/a/1", "models:/b/1", "-t", "127.0.0.1:5000/m:1", "--json"])
    assert code == 2
    assert "would all be pushed to 127.0.0.1:5000/m:1" in capsys.readouterr().out


def test_from_a_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["release", "--from", str(tmp_path / "none.txt"), "-t", "127.0.0.1:5000/m"])
    assert code == 2
    assert "cannot read --from" in capsys.readouterr().err


# -- the order of steps, with fakes for everything but release.py ---------------------


class FakeRelease:
    """Stands in for the model registry, the builder, the engine and the image registry,
    and writes down what was called, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, passes: bool = True) -> None:
        self.calls: list[str] = []
        self.tags: dict[str, str] = {}
        self.in_registry: set[str] = set()
        self.passes = passes
        self.recipe = {
            record.LOCK_DIGEST_TAG: "sha256:" + "1" * 64,
            record.BASE_DIGEST_TAG: "sha256:" + "2" * 64,
            record.VERSION_TAG: "0.1.0",
        }
        provenance = Provenance(
            reference="models:/wine/3",
            reached_through="version",  # type: ignore[arg-type]
            model_name="wine",
            model_version="3",
            content_digest="sha256:" + "c" * 64,
        )
        sourced = type("Sourced", (), {"provenance": provenance, "path": Path(), "files": ()})
        m = monkeypatch
        m.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
        m.setattr(release, "fetch_model", lambda *_, **__: sourced)
        m.setattr(release, "_recipe", lambda *_, **__: type("R", (), {"tags": dict(self.recipe)}))
        m.setattr(release, "_attest", self.attest)
        m.setattr(engine, "reachable", lambda: True)
        m.setattr(api, "build_oci_image", self.build)
        m.setattr(release, "verify_image", self.verify)
        m.setattr(publish, "push_stored", self.push)
        m.setattr(publish, "manifest_exists", lambda pinned: pinned in self.in_registry)
        m.setattr(record, "version_tags", lambda _: dict(self.tags))
        m.setattr(record, "record_release", self.record)
        m.setattr(record, "move_alias", self.alias)

    def build(self, reference: str, image: Any, outputs: Any, **kwargs: Any) -> Any:
        self.calls.append(f"build load={outputs.load} tag={kwargs['tag']}")
        return type("Built", (), {"manifest_digest": "sha256:" + "d" * 64, "epoch": 0})

    def verify(self, image: str, **kwargs: Any) -> verify.TestReport:
        self.calls.append(f"test {image}")
        return verify.TestReport(
            image=image,
            startup_seconds=1.0,
            latency_p50_ms=1.0,
            memory_bytes=None,
            endpoints=(("/ping", 200),),
            payloads=(),
            serves_as_labelled=self.passes,
        )

    def push(self, tag: str, digest: str, store: Any) -> Any:
        self.calls.append(f"push {tag}")
        pinned = f"{tag.rpartition(':')[0]}@{digest}"
        self.in_registry.add(pinned)
        return type("Pushed", (), {"pinned": pinned})

    def attest(self, pinned: str, *_: Any, **__: Any) -> tuple[Any, ...]:
        self.calls.append(f"attest {pinned}")
        return ()

    def alias(self, ref: Any, alias: str, *, image: str) -> record.Recorded:
        self.calls.append(f"alias {alias}")
        return record.Recorded(
            registry_uri="sqlite:///unused.db",
            model_name=ref.name,
            model_version=ref.version,
            tags={},
            alias=alias,
        )

    def record(
        self, ref: Any, tags: dict[str, str], *, alias: str | None, image: str
    ) -> record.Recorded:
        self.calls.append(f"record alias={alias}")
        self.tags.update(tags)
        return record.Recorded(
            registry_uri="sqlite:///unused.db",
            model_name=ref.name,
            model_version=ref.version,
            tags=tags,
            alias=alias,
        )


OPTIONS = release.ReleaseOptions(tags=("127.0.0.1:5000/wine",), alias="champion")


def test_build_test_push_record_in_that_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRelease(monkeypatch)
    report = release.release_model("models:/wine/3", OPTIONS)
    assert fake.calls == [
        "build load=True tag=127.0.0.1:5000/wine:wine-3",
        "test 127.0.0.1:5000/wine:wine-3",
        "push 127.0.0.1:5000/wine:wine-3",
        "attest 127.0.0.1:5000/wine@sha256:" + "d" * 64,
        "record alias=champion",
    ]
    assert report.status == "released"
    assert report.image == "127.0.0.1:5000/wine@sha256:" + "d" * 64
    assert fake.tags[record.IMAGE_TAG] == report.image
    assert [s.name for s in report.steps] == [
        "source",
        "lock",
        "check",
        "build",
        "test",
        "push",
        "attest",
        "record",
    ]


def test_each_step_is_announced_as_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRelease(monkeypatch)
    heard: list[str] = []
    results = release.release_models(("models:/wine/3",), OPTIONS, announce=heard.append)
    assert [s.name for s in results[0].steps] == [h.rpartition(": ")[2] for h in heard]  # type: ignore[union-attr]
    assert heard[0] == "[1/1] models:/wine/3: source"
    assert heard[3] == "[1/1] models:/wine/3: build"


def test_a_failed_test_pushes_and_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRelease(monkeypatch, passes=False)
    with pytest.raises(ImageTestError, match="nothing was pushed"):
        release.release_model("models:/wine/3", OPTIONS)
    assert fake.calls == [
        "build load=True tag=127.0.0.1:5000/wine:wine-3",
        "test 127.0.0.1:5000/wine:wine-3",
    ]


def test_no_test_says_so_and_loads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRelease(monkeypatch)
    report = release.release_model("models:/wine/3", replace(OPTIONS, test=False))
    assert fake.calls[0] == "build load=False tag=None"
    assert not report.tested
    assert report.test_skipped == "--no-test"


def test_a_second_release_is_a_no_op_unless_the_recipe_or_image_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRelease(monkeypatch)
    first = release.release_model("models:/wine/3", OPTIONS)
    fake.calls.clear()
    again = release.release_model("models:/wine/3", OPTIONS)
    assert again.status == "already released"
    assert again.image == first.image
    assert fake.calls == ["alias champion"]  # finishes a run stopped before its alias
    # --force, a new lock, another repository, or an image gone from the registry: build.
    assert release.release_model("models:/wine/3", replace(OPTIONS, force=True)).tags
    fake.recipe[record.LOCK_DIGEST_TAG] = "sha256:" + "9" * 64
    assert release.release_model("models:/wine/3", OPTIONS).status == "released"
    other = replace(OPTIONS, tags=("127.0.0.1:5000/other",))
    assert release.release_model("models:/wine/3", other).status == "released"
    fake.in_registry.clear()
    assert release.release_model("models:/wine/3", OPTIONS).status == "released"


def test_one_failure_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRelease(monkeypatch)
    real = release.release_model

    def flaky(reference: str, options: Any, **kwargs: Any) -> Any:
        if reference == "models:/broken/1":
            raise ImageTestError("the image of models:/broken/1 failed its test")
        return real(reference, options, **kwargs)

    monkeypatch.setattr(release, "release_model", flaky)
    results = release.release_models(("models:/broken/1", "models:/wine/3"), OPTIONS)
    assert isinstance(results[0], release.Failure)
    assert results[0].exit_code == ImageTestError.exit_code
    assert isinstance(results[1], release.ReleaseReport)


# -- --manifests: the pushed digest, sized from the release's test -------------------------


def _with_manifests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeRelease:
    """A release whose test measured memory, and a registry that serves the image's config
    (what ``packager.deploy.inputs.read_image`` reads)."""
    fake = FakeRelease(monkeypatch)

    def verify_with_memory(image: str, **kwargs: Any) -> verify.TestReport:
        return replace(fake.verify(image, **kwargs), startup_seconds=14.0, memory_bytes=2**28)

    def read_image(reference: str) -> ImageFacts:
        fake.calls.append(f"read {reference}")
        labels = (("io.packager.model.name", "wine"), ("io.packager.model.version", "3"))
        return ImageFacts(reference=reference, uid=10001, gid=10001, labels=labels)

    monkeypatch.setattr(release, "verify_image", verify_with_memory)
    monkeypatch.setattr(deploy_inputs, "read_image", read_image)
    return fake


def test_manifests_are_written_for_the_pushed_digest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _with_manifests(monkeypatch, tmp_path)
    options = replace(OPTIONS, manifests_dir=tmp_path / "deploy")
    report = release.release_model("models:/wine/3", options)
    pinned = "127.0.0.1:5000/wine@sha256:" + "d" * 64
    assert fake.calls[-1] == f"read {pinned}"  # after the record: the digest is final
    assert [s.name for s in report.steps][-2:] == ["record", "manifests"]
    assert report.manifests is not None
    assert report.manifests_skipped is None
    assert report.manifests.directory == tmp_path / "deploy" / "wine"
    assert "deployment.yaml" in report.manifests.files
    # Sized from the test: 256 MiB x 1.5, and 3 x 14 s rounded up to the 5 s period.
    assert report.manifests.sizing.memory == "384Mi"
    assert report.manifests.sizing.startup_budget_seconds == 45
    deployment = yaml.safe_load((tmp_path / "deploy" / "wine" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == pinned
    # A release again (forced) replaces the previous release's files.
    assert release.release_model("models:/wine/3", replace(options, force=True)).manifests


def test_manifests_of_an_already_released_version_say_why_none_were_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _with_manifests(monkeypatch, tmp_path)
    release.release_model("models:/wine/3", OPTIONS)
    again = release.release_model(
        "models:/wine/3", replace(OPTIONS, manifests_dir=tmp_path / "deploy")
    )
    assert again.status == "already released"
    assert again.manifests is None
    assert again.manifests_skipped == "already released: the first release wrote them"
    assert not (tmp_path / "deploy").exists()


def test_manifests_need_the_test_and_are_refused_with_no_test_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _with_manifests(monkeypatch, tmp_path)
    argv = ["release", "models:/wine/3", "-t", "127.0.0.1:5000/wine", "--no-test"]
    assert main([*argv, "--manifests", str(tmp_path / "deploy")]) == UsageError.exit_code
    assert "--no-test skips it" in capsys.readouterr().err
    assert fake.calls == []


def test_the_json_report_lists_the_manifests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _with_manifests(monkeypatch, tmp_path)
    argv = ["release", "models:/wine/3", "-t", "127.0.0.1:5000/wine", "--json"]
    assert main([*argv, "--manifests", str(tmp_path / "deploy")]) == 0
    (report,) = json.loads(capsys.readouterr().out)["releases"]
    assert report["manifests"]["directory"] == str(tmp_path / "deploy" / "wine")
    assert report["manifests"]["files"] == [
        "deployment.yaml",
        "horizontalpodautoscaler.yaml",
        "kustomization.yaml",
        "poddisruptionbudget.yaml",
        "service.yaml",
    ]
    assert report["manifests_skipped"] is None


# -- recording into a real SQLite registry ----------------------------------------------


@pytest.fixture
def sqlite_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> record.VersionRef:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("wine")
    for _ in range(2):
        client.create_model_version("wine", source=str(tmp_path / "model"))
    provenance = Provenance(
        reference="models:/wine/2",
        reached_through="version",  # type: ignore[arg-type]
        model_name="wine",
        model_version="2",
    )
    return record.version_of(provenance, RegistryOptions())


def test_record_sets_tags_then_alias_in_sqlite(sqlite_registry: record.VersionRef) -> None:
    from mlflow.tracking import MlflowClient

    image = "127.0.0.1:5000/wine@sha256:" + "a" * 64
    tags = {record.IMAGE_TAG: image, record.LOCK_DIGEST_TAG: "sha256:" + "b" * 64}
    done = record.record_release(sqlite_registry, tags, alias="champion", image=image)
    assert done.tags == tags
    assert record.version_tags(sqlite_registry) == tags
    client = MlflowClient(registry_uri=sqlite_registry.registry_uri)
    assert str(client.get_model_version_by_alias("wine", "champion").version) == "2"
    assert json.dumps(to_plain(done))  # the report is JSON-able
    # Moving the alias again is harmless: what a re-run of an interrupted release does.
    record.move_alias(sqlite_registry, "champion", image=image)
    assert str(client.get_model_version_by_alias("wine", "champion").version) == "2"


def test_a_deleted_version_is_a_clear_error_that_keeps_the_image(
    sqlite_registry: record.VersionRef,
) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(registry_uri=sqlite_registry.registry_uri).delete_model_version("wine", "2")
    image = "127.0.0.1:5000/wine@sha256:" + "a" * 64
    with pytest.raises(RecordError) as caught:
        record.record_release(sqlite_registry, {record.IMAGE_TAG: image}, alias="x", image=image)
    assert "no longer exists" in caught.value.message
    assert f"the pushed image {image} stays in place" in caught.value.message
    assert caught.value.exit_code == 25


def to_plain(value: Any) -> Any:
    from packager.jsonable import to_jsonable

    return to_jsonable(value)
