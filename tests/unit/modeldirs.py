"""Write small model directories by hand for unit tests of the spec reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PYFUNC_SKLEARN: dict[str, Any] = {
    "mlflow_version": "3.17.2",
    "model_size_bytes": 1234,
    "run_id": "0123456789abcdef0123456789abcdef",
    "flavors": {
        "python_function": {
            "loader_module": "mlflow.sklearn",
            "model_path": "model.pkl",
            "python_version": "3.11.7",
            "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
        },
        "sklearn": {
            "pickled_model": "model.pkl",
            "serialization_format": "cloudpickle",
            "sklearn_version": "1.5.2",
        },
    },
}


def write_model(
    root: Path,
    mlmodel: dict[str, Any] | str | None = None,
    files: dict[str, str | bytes] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if mlmodel is not None:
        text = mlmodel if isinstance(mlmodel, str) else yaml.safe_dump(mlmodel)
        (root / "MLmodel").write_text(text)
    defaults: dict[str, str | bytes] = {
        "requirements.txt": "mlflow==3.17.2\nscikit-learn==1.5.2\n",
        "python_env.yaml": "python: 3.11.7\nbuild_dependencies:\n- pip==24.0\n"
        "dependencies:\n- -r requirements.txt\n",
        "conda.yaml": "channels: [conda-forge]\ndependencies:\n- python=3.11.7\n- pip<=24.0\n"
        "- pip:\n  - mlflow==3.17.2\n",
        "model.pkl": b"\x80\x04not-a-real-pickle",
    }
    for name, content in {**defaults, **(files or {})}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root
