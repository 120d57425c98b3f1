"""A hostile local model through both backends and a real registry: nothing from outside the
model, no credential and no build-host path reaches an image, and every label and ENV value
reads back byte for byte the same from both backends' images in the registry."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MlflowServer
from tests.image.test_build import _search_saved_image

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

PACKAGER = str(Path(sys.executable).with_name("packager"))
HOSTILE_NAME = "${PATH} n${x?err} café 'q' \"d\" \\ `id` $(id)"
HOST_MARKER = b"HOST-FILE-OUTSIDE-THE-MODEL-7f3a"
PRIVATE_MARKER = b"PRIVATE-FILE-MARKER-91c2"


def _hostile_model(root: Path, mlflow_server: MlflowServer, index_url: str) -> Path:
    """The pyfunc-code test model, plus everything an attacker's run tried."""
    import mlflow.artifacts

    model = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/pyfunc-code/1",
            dst_path=str(root / "download"),
            tracking_uri=mlflow_server.uri,
        )
    )
    (root / "host-secret").write_bytes(HOST_MARKER)
    (model / "shadow").symlink_to(root / "host-secret")  # leaves the model
    (model / "MLmodel-link").symlink_to("MLmodel")  # stays inside: shipped as a file
    (model / "secret.env").write_bytes(PRIVATE_MARKER)
    (model / "secret.env").chmod(0o600)
    (model / "reqs").mkdir()
    (model / "reqs" / "private.txt").write_text(f"--extra-index-url {index_url}\n")
    with (model / "requirements.txt").open("a") as handle:
        handle.write("\n-r reqs/private.txt\n")
    (model / "registered_model_meta").write_text(
        yaml.safe_dump({"model_name": HOSTILE_NAME, "model_version": "7"}), encoding="utf-8"
    )
    return model


def _run(*argv: str, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACKAGER, *argv], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def _registry_config(address: str, repository: str, tag: str) -> dict[str, Any]:
    accept = ", ".join(
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    )
    request = urllib.request.Request(
        f"http://{address}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        manifest = json.load(answer)
    digest = manifest["config"]["digest"]
    with urllib.request.urlopen(
        f"http://{address}/v2/{repository}/blobs/{digest}", timeout=30
    ) as answer:
        config: dict[str, Any] = json.load(answer)["config"]
    return config


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under ``root``, and every member of every tar among them."""
    import tarfile

    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        hits += [str(path) for n in needles if n in data]
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        content = tar.extractfile(member).read()  # type: ignore[union-attr]
                        hits += [f"{path}:{member.name}" for n in needles if n in content]
    return hits


def test_a_hostile_model_through_both_backends_and_a_registry(  # noqa: PLR0917
    registry_env: MlflowServer,
    base_image: str,
    local_registry: str,
    private_index: Any,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    model = _hostile_model(tmp_path, registry_env, private_index.url_with_credentials)
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PACKAGER_CACHE_DIR": str(cache),
        # The index credentials reach uv from the environment, as in a CI pipeline.
        "PIP_EXTRA_INDEX_URL": private_index.url_with_credentials,
    }
    secrets = [private_index.password.encode(), private_index.username.encode(), HOST_MARKER]

    # The link out of the model stops the build before anything is built, naming it.
    refused = _run("build", str(model), "-t", "packager-test/hostile:1", env=env)
    assert refused.returncode == 5, refused.stderr[-3000:]
    assert "shadow" in refused.stderr
    assert "points outside the model" in refused.stderr
    assert "--skip-outside-links" in refused.stderr

    # With the flag, both backends build it without the link's target.
    common = ["--base-image", base_image, "--skip-outside-links", "--json"]
    docker_tag = "packager-test/hostile:1"
    built = _run("build", str(model), "--backend", "docker", "-t", docker_tag, *common, env=env)
    assert built.returncode == 0, built.stderr[-4000:]
    pushed_docker = f"{local_registry}/hostile-docker:1"
    docker_client.images.get(docker_tag).tag(f"{local_registry}/hostile-docker", "1")
    subprocess.run(["docker", "push", pushed_docker], check=True, capture_output=True, timeout=600)

    layout = tmp_path / "layout"
    pushed_oci = f"{local_registry}/hostile-oci:1"
    oci = _run(
        *("build", str(model), "--backend", "oci", "-o", str(layout), "-t", pushed_oci),
        *("--push", *common),
        env=env,
    )
    assert oci.returncode == 0, oci.stderr[-4000:]

    # Labels and ENV from the registry: byte for byte the same from both backends.
    configs = [
        _registry_config(local_registry, repository, "1")
        for repository in ("hostile-docker", "hostile-oci")
    ]
    assert configs[0]["Labels"] == configs[1]["Labels"]
    assert configs[0]["Env"] == configs[1]["Env"]
    labels = configs[0]["Labels"]
    assert labels["io.packager.model.name"] == HOSTILE_NAME
    assert labels["org.opencontainers.image.title"] == f"{HOSTILE_NAME} (MLflow model)"
    # No build-host path: not the model's directory, not the temporary directory.
    assert not [v for v in [*labels.values(), *configs[0]["Env"]] if str(tmp_path) in v]
    assert "org.opencontainers.image.source" not in labels

    # No credential and no host file anywhere: every layer, config and history of the
    # Docker image; every blob of the OCI layout; every file packager cached.
    saved = tmp_path / "docker-image.tar"
    subprocess.run(["docker", "save", "-o", str(saved), docker_tag], check=True, timeout=600)
    assert _search_saved_image(saved, secrets) == []
    assert _files_containing(layout, secrets) == []
    assert _files_containing(cache, secrets) == []
    context = tmp_path / "context"
    generated = _run("generate", str(model), "-o", str(context), *common, env=env)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert _files_containing(context, secrets) == []
    assert all(private_index.password not in out for out in (built.stderr, oci.stderr))
    saved.unlink()
    shutil.rmtree(layout)

    # The private file stays private: root's, 0600, unreadable by the server user; the
    # link inside the model is a plain copy of its target.
    script = (
        "import os, stat, sys\n"
        "s = os.stat('/opt/model/secret.env')\n"
        "print(oct(stat.S_IMODE(s.st_mode)), s.st_uid, os.access('/opt/model/secret.env', os.R_OK),"
        " os.path.islink('/opt/model/MLmodel-link'),"
        " open('/opt/model/MLmodel-link').read() == open('/opt/model/MLmodel').read())\n"
    )
    subprocess.run(["docker", "pull", pushed_oci], check=True, capture_output=True, timeout=600)
    for image in (docker_tag, pushed_oci):
        out = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()
        assert out == ["0o600", "0", "False", "False", "True"], (image, out)
    mode = (model / "secret.env").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600  # the source is untouched
    for image in (docker_tag, pushed_docker, pushed_oci):
        docker_client.images.remove(image, force=True)
