from __future__ import annotations

from pathlib import Path

import pytest

from packager.env.inputs import IndexOptions, build_inputs
from packager.env.lock import Lock, LockedPackage, packages_from, parse_lock, unsatisfied
from packager.env.target import Target
from packager.errors import (
    LockError,
    MissingWheelError,
    UnsupportedRequirementError,
    UsageError,
)
from packager.spec import read_spec
from tests.fixtures.wheelmaker import build_wheel
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

AMD = Target.make("3.11.7")
ARM = Target.make("3.12", "linux/arm64")


def test_target_tags() -> None:
    assert AMD.uv_platform == "x86_64-manylinux_2_36"
    assert ARM.uv_platform == "aarch64-manylinux_2_36"
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"} <= set(
        AMD.pip_platforms
    )
    assert AMD.accepts_wheel("six-1.17.0-py2.py3-none-any.whl")
    assert AMD.accepts_wheel("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl")
    assert not ARM.accepts_wheel("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl")
    assert not AMD.accepts_wheel("numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl")
    assert ARM.accepts_wheel("cryptography-50.0.2-cp311-abi3-manylinux_2_34_aarch64.whl")
    assert not AMD.accepts_wheel("numpy-2.4.6-cp311-cp311-macosx_11_0_arm64.whl")
    assert not AMD.accepts_wheel("x-1.0-cp311-cp311-manylinux_2_39_x86_64.whl")  # newer glibc
    with pytest.raises(UsageError):
        Target.make("3.11", "windows/amd64")
    with pytest.raises(UsageError):
        Target.make("eleven")


def _lock() -> Lock:
    return Lock(
        target=AMD,
        resolver="uv 0.13.9",
        inputs_digest="sha256:" + "0" * 64,
        index_url="https://pypi.org/simple",
        extra_index_urls=("https://pkgs.example.com/simple",),
        packages=(
            LockedPackage(
                name="numpy",
                version="2.4.6",
                hashes=("sha256:" + "a" * 64,),
                via=("pandas", "scikit-learn"),
            ),
            LockedPackage(
                name="uvloop",
                version="0.23.0",
                hashes=("sha256:" + "b" * 64,),
                via=("packager_server",),
                marker='sys_platform != "win32"',
            ),
        ),
    )


def test_lock_round_trip() -> None:
    lock = _lock()
    text = lock.render()
    assert parse_lock(text) == lock
    assert parse_lock(text).digest == lock.digest
    assert "    # via pandas\n    # via scikit-learn\n" in text


def test_lock_rejects_unpinned_and_foreign_files() -> None:
    with pytest.raises(LockError, match="not a packager lock"):
        parse_lock("numpy==1.0\n")
    text = _lock().render() + "pandas>=2\n"
    with pytest.raises(LockError, match="is not pinned with =="):
        parse_lock(text)


def test_packages_from_resolver_output() -> None:
    raw = (
        "numpy==2.4.6 \\\n    --hash=sha256:"
        + "c" * 64
        + " \\\n    --hash=sha256:"
        + "a" * 64
        + "\n    # via\n    #   pandas\n    #   -r model.in\nsix==1.17.0 \\\n"
        "    --hash=sha256:" + "d" * 64 + "\n    # via -r server.in\n"
    )
    numpy, six = packages_from(raw, describe=lambda v: v.replace("-r model.in", "MODEL"))
    assert numpy.hashes == ("sha256:" + "a" * 64, "sha256:" + "c" * 64)  # sorted
    assert numpy.via == ("pandas", "MODEL")
    assert six.via == ("-r server.in",)


def test_unsatisfied() -> None:
    lock = _lock()
    assert unsatisfied(lock, [("numpy>=2", "req:1"), ("uvloop", "server")]) == []
    problems = unsatisfied(
        lock,
        [
            ("numpy<2", "req:1"),
            ("pandas==2.0", "req:2"),
            ("pywin32; sys_platform == 'win32'", "req:3"),
        ],
    )
    assert problems == [
        "numpy==2.4.6 does not satisfy numpy<2 (req:1)",
        "pandas (req:2: pandas==2.0) is not in the lock",
    ]


def test_inputs_from_a_model_with_wheels_and_indexes(tmp_path: Path) -> None:
    private = build_wheel(tmp_path / "outside", "acme_lib", "1.0.0", {"acme_lib/__init__.py": ""})
    bundled = build_wheel(tmp_path / "m" / "wheels", "helper", "0.2.0", {"helper.py": ""})
    root = write_model(
        tmp_path / "m",
        PYFUNC_SKLEARN,
        {
            "requirements.txt": (
                "mlflow==3.17.2\n"
                "--extra-index-url https://pkgs.example.com/simple\n"
                f"/dbfs/FileStore/wheels/{private.name}\n"
                f"wheels/{bundled.name}\n"
                "-c constraints.txt\n"
            ),
            "constraints.txt": "urllib3<3\n",
        },
    )
    spec = read_spec(root)
    with pytest.raises(MissingWheelError, match=r"requirements.txt:3 .*--wheel-dir") as info:
        build_inputs(spec, AMD, IndexOptions(), ("uvicorn>=0.30",))
    assert info.value.exit_code == 13
    options = IndexOptions(
        extra_index_urls=("https://bob:t0ken-xyz@pkgs.example.com/simple/",),
        wheel_dirs=(private.parent,),
    )
    inputs = build_inputs(spec, AMD, options, ("uvicorn>=0.30",))
    assert inputs.model_requirements == (
        ("mlflow==3.17.2", "requirements.txt:1"),
        ("acme-lib==1.0.0", "requirements.txt:3"),
        ("helper==0.2.0", "requirements.txt:4"),
    )
    assert inputs.constraints == ("urllib3<3",)
    assert set(inputs.find_links) == {private.parent, bundled.parent.resolve()}
    # The model's index, with the user's credentials for the same host and path.
    assert inputs.extra_index_urls == ("https://bob:t0ken-xyz@pkgs.example.com/simple/",)
    assert "t0ken-xyz" in inputs.secret_env["UV_EXTRA_INDEX_URL"]
    assert "t0ken-xyz" not in inputs.digest("uv")
    assert inputs.digest("uv") != inputs.digest("pip-tools")
    other = build_inputs(spec, ARM, options, ("uvicorn>=0.30",))
    assert other.digest("uv") != inputs.digest("uv")


def test_source_trees_cannot_be_locked(tmp_path: Path) -> None:
    root = write_model(
        tmp_path / "m",
        PYFUNC_SKLEARN,
        {"requirements.txt": "-e git+https://example.com/x.git#egg=x\n"},
    )
    with pytest.raises(UnsupportedRequirementError, match="cannot be locked by hash"):
        build_inputs(read_spec(root), AMD, IndexOptions(), ())


def _python_model(requirements: str) -> dict[str, str | bytes]:
    return {"requirements.txt": requirements, "python_model.pkl": b"\x80\x04not-a-real-pickle"}


def test_a_python_model_keeps_the_cloudpickle_that_pickled_it(tmp_path: Path) -> None:
    pyfunc = {
        "loader_module": "mlflow.pyfunc.model",
        "python_model": "python_model.pkl",
        "cloudpickle_version": "3.1.2",
        "python_version": "3.11.7",
        "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
    }
    mlmodel = {"mlflow_version": "3.17.2", "flavors": {"python_function": pyfunc}}
    unpinned = write_model(tmp_path / "a", mlmodel, _python_model("mlflow==3.17.2\npandas\n"))
    inputs = build_inputs(read_spec(unpinned), AMD, IndexOptions(), ())
    assert inputs.model_requirements[-1] == (
        "cloudpickle==3.1.2",
        "MLmodel flavors.python_function.cloudpickle_version",
    )
    # The model's own cloudpickle requirement wins, whatever it says.
    pinned = write_model(tmp_path / "b", mlmodel, _python_model("mlflow==3.17.2\ncloudpickle>=3\n"))
    inputs = build_inputs(read_spec(pinned), AMD, IndexOptions(), ())
    assert [r for r, _ in inputs.model_requirements] == ["mlflow==3.17.2", "cloudpickle>=3"]
    # A flavor without a pickled PythonModel gets no pin.
    sklearn = write_model(tmp_path / "c", PYFUNC_SKLEARN)
    inputs = build_inputs(read_spec(sklearn), AMD, IndexOptions(), ())
    assert not any(r.startswith("cloudpickle") for r, _ in inputs.model_requirements)
