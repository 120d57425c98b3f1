from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from packager.digest import hash_file, manifest, tree_digest
from packager.errors import ModelFormatError, NotServableError
from packager.spec import read_spec
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model


def _mlmodel(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(PYFUNC_SKLEARN)
    data.update(changes)
    return data


def test_reads_a_sklearn_model(tmp_path: Path) -> None:
    root = write_model(tmp_path / "m", _mlmodel())
    spec = read_spec(root)
    assert spec.pyfunc.loader_module == "mlflow.sklearn"
    assert (spec.python_version, spec.python_minor) == ("3.11.7", "3.11")
    assert [f.name for f in spec.flavors] == ["python_function", "sklearn"]
    assert spec.flavors[1].version == "1.5.2"
    assert spec.serialization_formats == ("cloudpickle",)
    assert not spec.needs_skops
    assert [r.name for r in spec.requirements] == ["mlflow", "scikit-learn"]
    assert {e.path for e in spec.env_files} == {"requirements.txt", "python_env.yaml", "conda.yaml"}
    assert spec.python_env is not None
    assert spec.python_env.build_dependencies == ("pip==24.0",)
    assert spec.conda is not None
    assert not spec.conda.needs_conda
    assert spec.conda.pip == ("mlflow==3.17.2",)
    assert spec.model_size_bytes == 1234
    assert spec.size_on_disk == sum(e.size for e in manifest(root))
    assert spec.signature is None


def test_skops_models_need_skops(tmp_path: Path) -> None:
    data = _mlmodel()
    data["flavors"]["sklearn"]["serialization_format"] = "skops"
    spec = read_spec(write_model(tmp_path / "m", data, {"model.skops": b"x"}))
    assert spec.needs_skops


def test_artifacts_code_and_signature(tmp_path: Path) -> None:
    data = _mlmodel()
    data["flavors"] = {
        "python_function": {
            "loader_module": "mlflow.pyfunc.model",
            "python_model": "python_model.pkl",
            "python_version": "3.12.1",
            "code": "code",
            "cloudpickle_version": "3.1.1",
            "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
            "artifacts": {
                "weights": {"path": "artifacts/weights.bin", "uri": "s3://u:p@bucket/w.bin"},
                "tokenizer": {"path": "artifacts/tokenizer", "uri": "/tmp/tok"},
            },
        }
    }
    data["signature"] = {
        "inputs": json.dumps(
            [
                {"type": "string", "name": "text", "required": True},
                {"type": "double", "name": "bias", "required": False},
            ]
        ),
        "outputs": json.dumps(
            [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}]
        ),
        "params": json.dumps([{"name": "k", "type": "long", "default": 3, "shape": None}]),
    }
    data["saved_input_example_info"] = {
        "artifact_path": "input_example.json",
        "type": "dataframe",
        "serving_input_path": "serving_input_example.json",
    }
    root = write_model(
        tmp_path / "m",
        data,
        {
            "python_model.pkl": b"p",
            "code/textclf/__init__.py": "",
            "code/textclf/model.py": "x = 1\n",
            "code/helpers.py": "y = 2\n",
            "artifacts/weights.bin": b"\x00" * 100,
            "artifacts/tokenizer/vocab.txt": "a\nb\n",
            "artifacts/tokenizer/config.json": "{}",
            "input_example.json": "{}",
            "serving_input_example.json": "{}",
        },
    )
    spec = read_spec(root)
    assert spec.python_version == "3.12.1"
    assert [(c.path, c.kind, c.files) for c in spec.code] == [
        ("code/helpers.py", "file", 1),
        ("code/textclf", "directory", 2),
    ]
    tokenizer, weights = spec.artifacts
    assert (weights.name, weights.kind, weights.size, weights.files) == ("weights", "file", 100, 1)
    assert weights.sha256 == hash_file(root / "artifacts/weights.bin")
    assert weights.logged_from == "s3://bucket/w.bin"  # credentials stripped
    assert (tokenizer.kind, tokenizer.files) == ("directory", 2)
    expected_tree = tree_digest(
        e for e in manifest(root) if e.path.startswith("artifacts/tokenizer/")
    )
    assert tokenizer.sha256 == expected_tree.removeprefix("sha256:")
    assert spec.signature is not None
    assert spec.signature.inputs is not None
    assert [(f.name, f.type, f.required) for f in spec.signature.inputs.fields] == [
        ("text", "string", True),
        ("bias", "double", False),
    ]
    assert spec.signature.outputs is not None
    assert spec.signature.outputs.kind == "tensors"
    assert spec.signature.outputs.fields[0].shape == (-1, 2)
    assert [(p.name, p.type, p.default) for p in spec.signature.params] == [("k", "long", 3)]
    assert spec.input_example is not None
    assert spec.input_example.present


def test_python_version_falls_back_to_python_env(tmp_path: Path) -> None:
    data = _mlmodel()
    del data["flavors"]["python_function"]["python_version"]
    spec = read_spec(write_model(tmp_path / "m", data))
    assert (spec.python_version, spec.python_version_from) == ("3.11.7", "python_env.yaml")


def test_conda_packages_are_detected(tmp_path: Path) -> None:
    root = write_model(
        tmp_path / "m",
        _mlmodel(),
        {
            "conda.yaml": (
                "channels: [conda-forge]\ndependencies:\n- python=3.11.7\n- pip\n- libgomp=13.2\n"
                "- conda-forge::lightgbm>=4\n- pip:\n  - mlflow==3.17.2\n"
            )
        },
    )
    spec = read_spec(root)
    assert spec.conda is not None
    assert spec.conda.needs_conda
    assert spec.conda.conda_packages == ("libgomp=13.2", "conda-forge::lightgbm>=4")
    assert spec.conda.python == "3.11.7"


def test_env_files_never_keep_credentials(tmp_path: Path) -> None:
    root = write_model(
        tmp_path / "m",
        _mlmodel(),
        {
            "conda.yaml": "channels: [https://conda.anaconda.org/t/tk-secret1/private]\n"
            "dependencies:\n- python=3.11.7\n- pip:\n"
            "  - --extra-index-url https://u:pw-secret2@pkgs.example.com/simple\n",
            "python_env.yaml": "python: 3.11.7\nbuild_dependencies: []\ndependencies:\n"
            "- --index-url https://u:pw-secret3@pkgs.example.com/simple\n",
        },
    )
    spec = read_spec(root)
    text = repr(spec)
    for secret in ("tk-secret1", "pw-secret2", "pw-secret3"):
        assert secret not in text


def test_wheels_directory(tmp_path: Path) -> None:
    data = _mlmodel(wheels={"platform": "macOS-14.2-arm64-arm-64bit"})
    root = write_model(
        tmp_path / "m",
        data,
        {
            "wheels/acme-0.1.0-py3-none-any.whl": b"w1",
            "wheels/numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl": b"w2",
            "requirements.txt": "wheels/acme-0.1.0-py3-none-any.whl\n"
            "wheels/numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl\n",
        },
    )
    spec = read_spec(root)
    assert spec.wheels is not None
    assert spec.wheels.platform == "macOS-14.2-arm64-arm-64bit"
    assert [(w.name, w.pure) for w in spec.wheels.wheels] == [("acme", True), ("numpy", False)]
    assert all(line.exists_in_model for line in spec.requirements)
    assert spec.missing_local_wheels == ()


@pytest.mark.parametrize(
    ("mlmodel", "message"),
    [
        (None, "MLmodel not found"),
        ("flavors: [unclosed", "not valid YAML at line 1"),
        ("- a list", "must be a YAML mapping"),
        ({"mlflow_version": "3"}, "field 'flavors' is missing"),
        (
            {"flavors": {"python_function": {"python_version": "3.11"}}},
            "python_function.loader_module is missing",
        ),
        (
            {
                "flavors": {
                    "python_function": {
                        "loader_module": "x",
                        "python_version": "3.11",
                        "env": {"conda": "missing.yaml"},
                    }
                }
            },
            "names missing.yaml, which is not in the model",
        ),
        (
            {
                "flavors": {
                    "python_function": {
                        "loader_module": "x",
                        "python_version": "3.11",
                        "artifacts": {"w": {"path": "artifacts/w"}},
                    }
                }
            },
            "artifact 'w' should be at artifacts/w",
        ),
        (
            {
                "flavors": {"python_function": {"loader_module": "x", "python_version": "3.11"}},
                "signature": {"inputs": "[not json"},
            },
            "signature.inputs is not valid JSON",
        ),
        (
            {"flavors": {"python_function": {"loader_module": "x", "python_version": "eleven"}}},
            "'eleven' is not a Python version",
        ),
    ],
)
def test_malformed_models_name_the_file_and_field(
    tmp_path: Path, mlmodel: Any, message: str
) -> None:
    root = write_model(tmp_path / "m", mlmodel)
    with pytest.raises(ModelFormatError, match=message) as info:
        read_spec(root)
    assert info.value.exit_code == 5


def test_model_without_pyfunc_flavor_is_not_servable(tmp_path: Path) -> None:
    root = write_model(tmp_path / "m", {"flavors": {"keras": {"keras_version": "3.0"}}})
    with pytest.raises(NotServableError, match=r"no 'python_function' flavor \(it has: keras\)"):
        read_spec(root)
