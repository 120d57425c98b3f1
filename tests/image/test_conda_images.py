"""Models whose conda.yaml lists conda packages, built into images that use them.

The packages come from real conda channels built in the fixtures (tests/fixtures/conda):
the acme channel (a C library, a tool whose binary embeds its install prefix, a noarch
Python package) and a channel whose ``python`` package is the base image's own
interpreter, repackaged. The models are saved (or logged) by MLflow with those conda environments;
their predict calls the tool (PATH), loads the library with ctypes (LD_LIBRARY_PATH),
imports the noarch package (the conda environment's site-packages) and reports the
interpreter it runs on.

* Python from conda, logged to the tests' MLflow server: the OCI build reproduces its
  digest from empty caches, passes ``packager test``, and runs the model on
  ``/opt/conda/bin/python3.11``; the Docker backend's image of it has the same files and
  configuration and passes ``packager test``.
* No python in conda.yaml, the channel behind basic auth: the base's Python stays, the
  prefix provides the library and the tool, and the channel's password is nowhere in the
  image, the cache or the output.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MlflowServer
from tests.fixtures.conda.models import (
    Channels,
    build_channels,
    log_conda_model,
    save_conda_model,
)
from tests.image.test_oci import _tree
from tests.image.test_trust_images import _files_containing

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

PACKAGER = str(Path(sys.executable).with_name("packager"))
TIMEOUT = 1800


@pytest.fixture(scope="module")
def channels(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Channels:
    return build_channels(tmp_path_factory.mktemp("conda-channels"), base_image)


def start(*args: str, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PACKAGER, *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PACKAGER_CACHE_DIR": str(cache)},
    )


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out + err[-4000:]
    assert "Traceback" not in err
    result: dict[str, Any] = json.loads(out)
    return result


def predict_in(image: str) -> list[dict[str, Any]]:
    """The model's answers for its example, by the image's own interpreter and MLflow."""
    script = (
        "import mlflow.pyfunc, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('/opt/model')\n"
        "print(model.predict(pd.DataFrame({'x': [1, 2, 3]})).to_json(orient='records'))\n"
    )
    out = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--entrypoint", "python", image, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return rows


def check_with_packager_test(image: str, model: Path | str) -> None:
    check = subprocess.run(
        [PACKAGER, "test", image, "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert "passed" in check.stdout


@pytest.fixture
def images(docker_client: Any) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for tag in made:
        with contextlib.suppress(Exception):  # already gone
            docker_client.images.remove(tag, force=True)


def test_python_from_conda_on_both_backends(  # noqa: PLR0917 - pytest fixtures
    channels: Channels,
    base_image: str,
    registry_env: MlflowServer,
    tmp_path: Path,
    images: list[str],
    docker_client: Any,
    request: pytest.FixtureRequest,
) -> None:
    """Logged to the tests' MLflow server and built from its registry."""
    from mlflow.tracking import MlflowClient

    model = log_conda_model(
        "acme-conda", [f"python={channels.python_version}", "acme-tool", "acme-py"], tmp_path
    )
    client = MlflowClient(tracking_uri=registry_env.uri)
    request.addfinalizer(lambda: client.delete_registered_model("acme-conda"))
    common = [model, "--base-image", base_image, "--mlflow-skinny", *channels.flags]
    oci_tag, docker_tag = "packager-test/conda-python:1", "packager-test/conda-python-docker:1"
    images += [oci_tag, docker_tag]
    # Two builds at once from empty caches (the conda packages fetched and installed by
    # each): one digest.
    first = start("build", *common, "-t", oci_tag, "--load", cache=tmp_path / "a")
    second = start("build", *common, "-o", str(tmp_path / "layout"), cache=tmp_path / "b")
    a, b = finish(first), finish(second)
    assert a["manifest_digest"] == b["manifest_digest"], (a, b)
    check_with_packager_test(oci_tag, model)
    rows = predict_in(oci_tag)
    assert [r["scaled"] for r in rows] == [10, 17, 24]  # libacme, through LD_LIBRARY_PATH
    assert [r["featurized"] for r in rows] == [3.5, 6.5, 9.5]  # acme-py, noarch
    # The tool's binary prefix placeholder was rewritten for /opt/conda.
    assert {r["tool"] for r in rows} == {"/opt/conda 45"}
    assert {r["python"] for r in rows} == {"/opt/conda/bin/python3.11"}
    assert {r["site"] for r in rows} == {
        "/opt/conda/lib/python3.11/site-packages/acme_py/__init__.py"
    }

    # The Docker backend: the same files (ADD of the same layer, the same venv) and config.
    finish(start("build", *common, "--backend", "docker", "-t", docker_tag, cache=tmp_path / "a"))
    check_with_packager_test(docker_tag, model)
    oci_files, docker_files = _tree(oci_tag), _tree(docker_tag)
    assert any(path.startswith("/opt/conda/bin/") for path in oci_files)
    changed = sorted(
        p for p in set(oci_files) | set(docker_files) if oci_files.get(p) != docker_files.get(p)
    )
    assert changed == []
    configs = [docker_client.images.get(tag).attrs["Config"] for tag in (oci_tag, docker_tag)]
    for key in ("User", "Entrypoint", "Env", "Labels", "Healthcheck"):
        assert configs[0].get(key) == configs[1].get(key), key


def test_conda_libraries_and_tools_on_the_bases_python_from_a_private_channel(
    channels: Channels, base_image: str, tmp_path: Path, images: list[str]
) -> None:
    """The acme channel behind basic auth: its credentials reach no lock, log or layer."""
    from tests.fixtures.conda.server import serve_channel

    model = save_conda_model(tmp_path / "model", ["acme-tool"])
    tag = "packager-test/conda-tools:1"
    images.append(tag)
    cache, archive = tmp_path / "c", tmp_path / "out" / "image.tar"
    with serve_channel(channels.acme) as server:
        common = ["--base-image", base_image, "--mlflow-skinny"]
        common += ["--conda-channel", server.url_with_credentials]
        process = start(
            "build",
            str(model),
            *common,
            "-t",
            tag,
            "--load",
            "--archive",
            str(archive),
            cache=cache,
        )
        out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out + err[-4000:]
    secret = server.password.encode()
    assert secret not in (out + err).encode()
    assert _files_containing(archive.parent, [secret]) == []
    assert _files_containing(cache, [secret]) == []
    check_with_packager_test(tag, model)
    rows = predict_in(tag)
    assert [r["scaled"] for r in rows] == [10, 17, 24]
    assert {r["tool"] for r in rows} == {"/opt/conda 45"}
    assert {r["python"] for r in rows} == {"/usr/bin/python3.11"}  # the base's
