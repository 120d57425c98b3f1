"""``packager manifests`` against a real registry on 127.0.0.1: a tag resolves to the digest
the registry serves, and the uid and labels come from the image's config. The image is a
tiny OCI image assembled here (one small layer) and pushed with packager's own registry
client: nothing is built and no engine image is created."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from packager.cli import main
from packager.deploy import inputs
from packager.image.registry import push_image

pytestmark = [pytest.mark.docker]

LABELS = {
    "io.packager.model.name": "tiny",
    "io.packager.model.version": "7",
    "io.packager.model.run-id": "feedbeef",
    "io.packager.model.digest": "sha256:" + "12" * 32,
    "org.opencontainers.image.title": "tiny (MLflow model)",
}


def _blob(directory: Path, data: bytes) -> tuple[str, Path]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = directory / digest.removeprefix("sha256:")
    path.write_bytes(data)
    return digest, path


def _push_tiny_image(registry: str, tmp_path: Path) -> tuple[str, str]:
    """Push a one-layer OCI image as REGISTRY/manifests-test:1; its tag and digest."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    layer_digest, layer_path = _blob(tmp_path, layer.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"User": "10001:10001", "Labels": LABELS},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_path = _blob(tmp_path, json.dumps(config, sort_keys=True).encode())
    media = "application/vnd.oci.image.manifest.v1+json"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_path.stat().st_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer_path.stat().st_size,
                }
            ],
        },
        sort_keys=True,
    ).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    tag = f"{registry}/manifests-test:1"
    pushed = push_image(
        tag, manifest, digest, media, [(config_digest, config_path), (layer_digest, layer_path)]
    )
    assert pushed.digest == digest
    return tag, digest


def test_a_tag_in_a_real_registry_is_pinned_and_deployed(
    local_registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag, digest = _push_tiny_image(local_registry, tmp_path)
    pinned = f"{local_registry}/manifests-test@{digest}"
    facts = inputs.read_image(tag)
    assert facts.reference == pinned
    assert (facts.uid, facts.gid) == (10001, 10001)
    assert dict(facts.labels) == LABELS

    out = tmp_path / "deploy"
    argv = ["manifests", tag, "--startup-seconds", "4", "--memory", "200Mi", "-o", str(out)]
    assert main([*argv, "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["image"] == pinned
    assert written["sizing"]["memory"] == "304Mi"
    deployment = yaml.safe_load((out / "deployment.yaml").read_text())
    kubernetes_validate.validate(deployment, "1.34.0", strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == pinned
    assert deployment["metadata"]["annotations"] == LABELS

    # The same inputs give the same bytes; a non-empty directory needs --force.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*argv, "--json"]) == 2
    assert "not empty" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert main([*argv, "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert pinned in capsys.readouterr().out


def test_a_digest_the_registry_lacks_is_an_error(
    local_registry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{local_registry}/manifests-test@sha256:{'0' * 64}"
    argv = ["manifests", missing, "--startup-seconds", "4", "--memory", "200Mi"]
    assert main([*argv, "-o", str(tmp_path / "deploy"), "--json"]) == 23
    error = json.loads(capsys.readouterr().out)["error"]
    assert "cannot read" in error["message"]
    assert not (tmp_path / "deploy").exists()
