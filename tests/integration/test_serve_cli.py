"""`packager serve`: resolve a registered model and serve it in this environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import MlflowServer, free_port, wait_for_http

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def test_serve_a_registered_model(
    registry_env: MlflowServer, cache_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    exe = Path(sys.executable).with_name("packager")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(exe), "serve", "models:/sk-skops@champion", "--port", str(port), "--workers", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ},
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ready", 120, process, log)
        example = next((cache_dir / "models" / "v1" / "objects").glob("*/model"))
        body = (example / "serving_input_example.json").read_bytes()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 2
        assert all(p in (0, 1, 2) for p in predictions)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert 'model="sk-skops",version="1"' in response.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0


def test_serve_refuses_a_model_that_is_not_servable(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("flavors: {keras: {}}\n")
    exe = Path(sys.executable).with_name("packager")
    result = subprocess.run(
        [str(exe), "serve", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 6
    assert "python_function" in result.stderr
