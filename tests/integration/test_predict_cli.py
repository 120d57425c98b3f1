"""`packager predict`: resolve a registered model and score a file in this environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.datasets import load_wine

from tests.conftest import MlflowServer

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


def test_predict_a_registered_model(registry_env: MlflowServer, tmp_path: Path) -> None:
    wine = load_wine(as_frame=True)
    source = tmp_path / "wine.csv"
    wine.data.astype("float64").to_csv(source, index=False)
    out = tmp_path / "scored.csv"
    exe = Path(sys.executable).with_name("packager")
    command = [str(exe), "predict", "models:/sk-skops@champion", "-i", str(source)]
    result = subprocess.run(
        [*command, "-o", str(out), "--chunk-rows", "50", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["provenance"]["model_name"] == "sk-skops"
    assert "178 rows scored" in result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction"
    predictions = [int(v) for v in lines[1:]]
    assert len(predictions) == len(wine.target)
    # The fixture's tree is fitted on these rows: it gives their labels back.
    agree = sum(p == t for p, t in zip(predictions, wine.target, strict=True))
    assert agree / len(predictions) > 0.95
