"""``packager_server.expected``: what ``packager test`` reads from its second container."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

NOISY_MODEL = """
import os, sys
import mlflow
from mlflow.pyfunc import PythonModel

class Noisy(PythonModel):
    def predict(self, context, model_input, params=None):
        print("1/1 progress bar")  # as Keras' predict does
        os.write(1, b"from native code\\n")
        return [len(model_input)]

print("loading")
mlflow.models.set_model(Noisy())
"""


def test_only_the_answers_reach_stdout(tmp_path: Path) -> None:
    import mlflow.pyfunc

    code = tmp_path / "noisy.py"
    code.write_text(NOISY_MODEL)
    model = tmp_path / "model"
    mlflow.pyfunc.save_model(str(model), python_model=str(code))
    request = tmp_path / "0.json"
    request.write_text('{"inputs": [[1.0], [2.0]]}')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "packager_server.expected",
            str(model),
            "application/json",
            str(request),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(result.stdout) == [{"status": 200, "body": {"predictions": [2]}}]
    assert "progress bar" in result.stderr
    assert "from native code" in result.stderr
