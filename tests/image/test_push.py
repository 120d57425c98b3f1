"""Push to a real registry on 127.0.0.1, pull back by digest, test the pulled image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from tests.conftest import MlflowServer
from tests.image.conftest import registry

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]


def test_push_pull_by_digest_and_test(
    registry_env: MlflowServer,
    pyfunc_code_image: str,
    local_registry: str,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    remote = f"{local_registry}/pyfunc-code:1"
    docker_client.images.get(pyfunc_code_image).tag(f"{local_registry}/pyfunc-code", "1")
    assert main(["push", remote, "--json"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["digest"].startswith("sha256:")
    pinned = pushed["pinned"]
    assert pinned == f"{local_registry}/pyfunc-code@{pushed['digest']}"
    # Drop the local tag, pull back by digest, and test what came back.
    docker_client.images.remove(remote)
    subprocess.run(["docker", "pull", pinned], check=True, capture_output=True, timeout=600)
    pulled = docker_client.images.get(pinned)
    assert pushed["digest"] in " ".join(pulled.attrs["RepoDigests"])
    assert main(["test", pinned, "--model", "models:/pyfunc-code/1"]) == 0
    assert "passed" in capsys.readouterr().out


def test_a_refused_push_is_an_error(
    pyfunc_code_image: str, docker_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with registry(tmp_path / "readonly", readonly=True) as address:
        remote = f"{address}/pyfunc-code:1"
        docker_client.images.get(pyfunc_code_image).tag(f"{address}/pyfunc-code", "1")
        try:
            code = main(["push", remote, "--json"])
            out = json.loads(capsys.readouterr().out)
        finally:
            docker_client.images.remove(remote)
    assert code == 21
    assert "refused" in out["error"]["message"]
    assert "digest" not in out
