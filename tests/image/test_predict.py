"""Batch scoring from the image: ``docker run IMAGE predict --input … --output …``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]


def test_docker_run_image_predict(
    docker_client: Any, pyfunc_code_image: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # the image's user is not root
    rows = ['"a good day, great"', "awful", '"bad\nand good"'] * 40
    (data / "in.csv").write_text("text\n" + "\n".join(rows) + "\n")
    container = docker_client.containers.run(
        pyfunc_code_image,
        ["predict", "--input", "/data/in.csv", "--output", "/data/out.csv", "--chunk-rows", "25"],
        volumes={str(data): {"bind": "/data", "mode": "rw"}},
        network_disabled=True,
        detach=True,
    )
    try:
        status = container.wait(timeout=300)
        logs = bytes(container.logs()).decode(errors="replace")
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, logs
    assert "120 rows scored" in logs
    lines = (data / "out.csv").read_text().splitlines()
    assert lines[0] == "prediction"
    assert [float(v) for v in lines[1:]] == [5.0, -3.0, 0.0] * 40
    assert sorted(p.name for p in data.iterdir()) == ["in.csv", "out.csv"]
