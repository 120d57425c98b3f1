"""`packager test`: it checks the image first, needs only packager and an engine (MLflow's
answers come from a second container of the image), and reports start-up time and memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from tests.conftest import ROOT, MlflowServer

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]


@pytest.mark.parametrize(
    ("image", "code", "message"),
    [
        ("packager-test/no-such-image:1", 23, "is not in the local Docker engine"),
        ("Not A Valid Reference!", 23, "is not a valid image reference"),
    ],
)
def test_a_missing_or_invalid_image_is_a_clear_error(
    docker_client: Any, image: str, code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # --model names a model that cannot be fetched: the image is checked before it.
    assert main(["test", image, "--model", "models:/nowhere/1", "--json"]) == code
    error = json.loads(capsys.readouterr().out)["error"]
    assert message in error["message"]
    assert "bug" not in error["message"]


def test_an_image_packager_did_not_build_is_refused(
    base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["test", base_image, "--json"]) == 24
    assert "was not built by packager" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_packager_test_needs_only_packager_and_an_engine(
    registry_env: MlflowServer,
    pyfunc_code_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A release runner has packager and nothing of the model's: no numpy, no pandas, no
    scikit-learn, and no --model (the labels say which model the image serves)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "-o",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            str(Path(sys.executable).with_name("uv")),
            *("pip", "install", "--quiet", "--python", str(venv / "bin" / "python")),
            *("-c", str(ROOT / "constraints" / "dev.txt")),
            str(next(tmp_path.glob("mlflow_packager-*.whl"))),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    lacks = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import numpy"], capture_output=True, check=False
    )
    assert lacks.returncode != 0  # the model's environment is not here
    result = subprocess.run(
        [str(venv / "bin" / "packager"), "test", pyfunc_code_image, "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["passed"]
    assert report["labelled_as"] == 'model="pyfunc-code",version="1"'
    assert [p["name"] for p in report["payloads"]] == ["serving_input_example.json"]
    assert report["startup_seconds"] > 0
    assert report["memory_bytes"] > 10 * 2**20  # a Python with MLflow loaded
    assert report["built_from_model"] is None
    # With --model, the content digest of that model is checked against the label.
    assert main(["test", pyfunc_code_image, "--model", "models:/pyfunc-code/1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["built_from_model"] is True
    assert main(["test", pyfunc_code_image, "--model", "models:/sk-cloudpickle/1", "--json"]) == 20
    assert json.loads(capsys.readouterr().out)["built_from_model"] is False


def test_the_engine_says_which_bases_it_lacks(
    base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `generate`'s warning about a missing base asks the real engine."""
    from packager import api

    assert api.engine_reachable()
    assert not api.base_missing(base_image)
    assert api.base_missing("packager-test/no-such-base:3.11")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'none.sock'}")
    assert not api.engine_reachable()
    assert not api.base_missing("packager-test/no-such-base:3.11")  # no engine: no claim
