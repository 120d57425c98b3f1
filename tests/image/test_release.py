"""``packager release`` end to end: a real ``mlflow server``, the OCI backend, the engine
for the test, Debian's docker-registry. One release of two registered models, a look at
what the registries hold, a pull of one image by digest that passes ``packager test``, and
a re-run that must be a no-op. test_release_rebuild.py rebuilds both digests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from packager import attest, publish, record
from packager.cli import main
from packager.errors import RecordError
from packager.image.registry import Client, parse_target
from tests.conftest import MlflowServer

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

# Two registered models released in one call: the code-and-artifacts model and a
# scikit-learn model logged with cloudpickle (another name, another version number).
MODELS = {"pyfunc-code": "1", "sk-cloudpickle": "2"}


@pytest.fixture
def live_alias_removed_after(mlflow_server: MlflowServer) -> Iterator[None]:
    """The alias the release below moves is removed afterwards: other tests list these
    models' aliases (test_inspect_registry.py expects sk-cloudpickle/2 to have none). The
    version tags stay: test_release_rebuild.py reads them."""
    yield
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    for name in MODELS:
        with contextlib.suppress(Exception):
            client.delete_registered_model_alias(name, "live")


@pytest.mark.usefixtures("registry_env", "live_alias_removed_after")
def test_release_two_models_then_already_released(
    base_image: str,
    local_registry: str,
    docker_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    repository = f"{local_registry}/released"
    models = [f"models:/{name}/{version}" for name, version in MODELS.items()]
    argv = ["release", *models, "-t", repository, "--base-image", base_image]
    argv += ["--alias", "live", "--attestations-dir", str(tmp_path), "--json"]
    argv += ["--manifests", str(tmp_path / "deploy")]
    started = time.monotonic()
    code = main(argv)
    first_seconds = time.monotonic() - started
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["failed"] == []
    reports = out["releases"]
    assert [r["model"] for r in reports] == models
    mlflow_client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    for report, (name, version) in zip(reports, MODELS.items(), strict=True):
        assert report["status"] == "released"
        assert report["tags"] == [f"{repository}:{name}-{version}"]
        assert report["image"].startswith(f"{repository}@sha256:")
        assert report["tested"] is True
        assert report["test"]["built_from_model"] is True
        assert [s["name"] for s in report["steps"]] == [
            "source",
            "lock",
            "check",
            "build",
            "test",
            "push",
            "attest",
            "record",
            "manifests",
        ]
        # The manifests run the pushed digest, sized from the test's own measurements.
        deploy = tmp_path / "deploy" / name
        assert report["manifests"]["directory"] == str(deploy)
        deployment = yaml.safe_load((deploy / "deployment.yaml").read_text())
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == report["image"]
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
        assert report["manifests"]["measured_from"] == "packager release's test"

        # What the registries hold: the image by digest, the version's tags and the alias.
        assert publish.manifest_exists(report["image"])
        recorded = mlflow_client.get_model_version(name, version)
        assert recorded.tags[record.IMAGE_TAG] == report["image"]
        assert recorded.tags[record.LOCK_DIGEST_TAG] == report["lock_digest"]
        assert recorded.tags[record.BASE_DIGEST_TAG] == report["base_digest"]
        assert recorded.tags[record.VERSION_TAG] == report["packager_version"]
        assert str(mlflow_client.get_model_version_by_alias(name, "live").version) == version

        _check_attestations(report, tmp_path, docker_client)
        assert main(["attestations", report["image"], "--json"]) == 0
        checked = json.loads(capsys.readouterr().out)
        assert checked["verified"] is True, checked["problems"]
        assert checked["attestations"] == {a["kind"]: a["pinned"] for a in report["attestations"]}
    assert reports[0]["image"] != reports[1]["image"]

    # What a deploy tool does: pull the second image by digest, from the registry alone.
    pinned = reports[1]["image"]
    for tag in reports[1]["tags"]:
        docker_client.images.remove(tag, force=True)
    pulled = subprocess.run(
        ["docker", "pull", pinned], capture_output=True, text=True, timeout=600, check=False
    )
    assert pulled.returncode == 0, pulled.stderr
    assert main(["test", pinned, "--model", models[1]]) == 0
    assert "passed" in capsys.readouterr().out
    docker_client.images.remove(pinned, force=True)

    # The same release again: nothing built, pushed or recorded.
    started = time.monotonic()
    assert main(argv) == 0
    again_seconds = time.monotonic() - started
    again_reports = json.loads(capsys.readouterr().out)["releases"]
    for again, report in zip(again_reports, reports, strict=True):
        assert again["status"] == "already released"
        assert again["image"] == report["image"]
        assert again["tags"] == []
        assert again["recorded"]["tags"] == {}  # only the alias is set again
        assert again["recorded"]["alias"] == "live"
        assert "build" not in [s["name"] for s in again["steps"]]
        assert "push" not in [s["name"] for s in again["steps"]]
        assert again["manifests_skipped"] == "already released: the first release wrote them"
    # Timings are printed (README's figures), never asserted: they depend on the machine.
    print(f"release of two: {first_seconds:.1f}s, already released: {again_seconds:.1f}s")


@pytest.mark.usefixtures("registry_env")
def test_release_with_the_docker_backend(  # noqa: PLR0917 - pytest fixtures
    base_image: str,
    local_registry: str,
    pyfunc_code_image: str,
    docker_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--backend docker``: the engine builds (its cache holds the dependencies stage of
    pyfunc-code's image, built by the Docker-backend fixture), tests, pushes, attests and
    records, here on a copy of pyfunc-code/1 registered under another name; a re-run is
    a no-op, and ``packager rebuild`` refuses the engine's image (not byte-reproducible)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    name = "pyfunc-code-engine"
    version = str(client.copy_model_version("models:/pyfunc-code/1", name).version)
    repository = f"{local_registry}/engine"
    argv = ["release", f"models:/{name}/{version}", "-t", repository, "--backend", "docker"]
    argv += ["--base-image", base_image, "--attestations-dir", str(tmp_path), "--json"]
    try:
        code = main(argv)
        out = json.loads(capsys.readouterr().out)
        assert code == 0, out
        (report,) = out["releases"]
        assert report["status"] == "released"
        assert report["tested"] is True
        assert report["tags"] == [f"{repository}:{name}-{version}"]
        assert report["image"].startswith(f"{repository}@sha256:")
        assert publish.manifest_exists(report["image"])
        recorded = client.get_model_version(name, version).tags
        assert recorded[record.IMAGE_TAG] == report["image"]
        _check_attestations(report, tmp_path, docker_client)

        assert main(argv) == 0
        (again,) = json.loads(capsys.readouterr().out)["releases"]
        assert again["status"] == "already released"
        assert again["image"] == report["image"]

        assert main(["rebuild", report["image"]]) == 26
        assert "docker backend" in capsys.readouterr().err
    finally:
        client.delete_registered_model(name)
        for tag in [t for i in docker_client.images.list() for t in i.tags]:
            if tag.startswith(f"{repository}:"):
                docker_client.images.remove(tag, force=True)


@pytest.mark.usefixtures("registered_models")
def test_recording_into_a_deleted_version_names_the_image_it_keeps(
    mlflow_server: MlflowServer,
) -> None:
    """The real server's own "does not exist" answer, translated."""
    ref = record.VersionRef(
        name="pyfunc-code",
        version="999",
        tracking_uri=mlflow_server.uri,
        registry_uri=mlflow_server.uri,
    )
    image = "127.0.0.1:5000/released@sha256:" + "e" * 64
    with pytest.raises(RecordError) as caught:
        record.record_release(ref, {record.IMAGE_TAG: image}, alias=None, image=image)
    assert "no longer exists" in caught.value.message
    assert f"{image} stays in place" in caught.value.message


INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted((d.metadata['Name'], d.version) for d in m.distributions())))"
)


def _check_attestations(report: dict[str, Any], written: Path, docker_client: Any) -> None:
    """Both artifacts are in the registry under cosign's tags, with the image as subject;
    the SBOM is valid CycloneDX and lists exactly the distributions installed in the image
    and the base's Debian packages."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    image = report["image"]
    name, _, digest = image.partition("@")
    by_kind = {a["kind"]: a for a in report["attestations"]}
    assert set(by_kind) == {"sbom", "att"}
    client = Client(parse_target(f"{name}:probe"))
    documents = {}
    for kind, pushed in by_kind.items():
        assert pushed["reference"] == f"{name}:{digest.replace(':', '-')}.{kind}"
        body, _ = client.get_manifest(pushed["reference"].rpartition(":")[2])
        manifest = json.loads(body)
        assert manifest["subject"]["digest"] == digest
        assert manifest["artifactType"] == pushed["media_type"]
        layer = manifest["layers"][0]
        assert layer["digest"] == pushed["document_digest"]
        blob = written / f"{kind}.blob"
        client.fetch_blob(layer["digest"], blob)
        documents[kind] = blob.read_bytes()
        on_disk = written / f"{digest.replace(':', '-')}.{kind}.json"
        assert on_disk.read_bytes() == documents[kind]
    sbom = documents["sbom"]
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom.decode()) is None
    container = docker_client.containers.run(
        report["tags"][0],
        entrypoint=["python", "-c", INSTALLED],
        detach=True,
        network_mode="none",
    )
    try:
        status = container.wait(timeout=120)
        output = container.logs(stdout=True, stderr=False)
        errors = container.logs(stdout=False, stderr=True)
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, errors.decode(errors="replace")
    assert output.strip(), errors.decode(errors="replace")
    installed = {(n.lower().replace("_", "-"), v) for n, v in json.loads(output)}
    listed = {(n.lower().replace("_", "-"), v) for n, v in attest.installed_names(sbom)}
    assert listed == installed
    # The base's Debian packages: exactly what dpkg itself says is installed in the image.
    components = json.loads(sbom)["components"]
    debian = {
        (c["name"], c["version"])
        for c in components
        if c.get("purl", "").startswith("pkg:deb/debian/")
    }
    dpkg = docker_client.containers.run(
        report["tags"][0],
        entrypoint=["dpkg-query", "-W", "-f", "${db:Status-Status} ${Package} ${Version}\n"],
        remove=True,
        network_mode="none",
    ).decode()
    installed_debs = {
        (name, version)
        for status, name, version in (line.split(" ", 2) for line in dpkg.splitlines())
        if status == "installed"
    }
    assert "libc6" in {name for name, _ in installed_debs}
    assert debian == installed_debs
    statement = json.loads(documents["att"])
    assert statement["subject"][0]["digest"] == {"sha256": digest.removeprefix("sha256:")}
    resolved = {
        d["name"] for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    }
    assert resolved == {"model", "lock", "base"}
