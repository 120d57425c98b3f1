from __future__ import annotations

from pathlib import Path

import pytest

from packager.env.inputs import IndexOptions, LockInputs, build_inputs
from packager.env.lock import Lock, LockedPackage, packages_from, parse_lock, unsatisfied
from packager.env.resolve import ResolverName, lock
from packager.env.target import Target
from packager.errors import (
    CommandFailedError,
    IndexAuthError,
    LockError,
    MissingWheelError,
    PackagerError,
    ResolutionError,
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


# Credentials and direct URLs written in the model (trust boundaries, item 12).

MODEL_SECRET = "SECRET-written-in-the-model"


@pytest.fixture
def no_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """NETRC pointing at a file that does not exist yet (this machine's ~/.netrc unread)."""
    path = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(path))
    return path


def test_credentials_in_the_models_index_line_are_refused_not_dropped(
    tmp_path: Path, no_netrc: Path
) -> None:
    root = write_model(
        tmp_path / "m",
        PYFUNC_SKLEARN,
        {
            "requirements.txt": (
                f"--extra-index-url https://ci:{MODEL_SECRET}@pkgs.example.com/simple\n"
                "mlflow==3.17.2\n"
            )
        },
    )
    spec = read_spec(root)
    with pytest.raises(IndexAuthError) as info:
        build_inputs(spec, AMD, IndexOptions(), ())
    assert info.value.exit_code == 22
    message = str(info.value)
    assert "requirements.txt:1" in message
    assert "https://pkgs.example.com/simple" in message
    assert "does not use credentials stored in a model" in message
    assert "--extra-index-url" in (info.value.hint or "")
    assert "netrc" in (info.value.hint or "")
    assert MODEL_SECRET not in message
    # The user's own credentials for that index (host and path) are used instead...
    options = IndexOptions(extra_index_urls=("https://bob:t0ken-xyz@pkgs.example.com/simple/",))
    inputs = build_inputs(spec, AMD, options, ())
    assert inputs.extra_index_urls == ("https://bob:t0ken-xyz@pkgs.example.com/simple/",)
    assert MODEL_SECRET not in repr(inputs) + inputs.digest("uv")
    # ...as are netrc's, which uv and pip read themselves.
    no_netrc.write_text("machine pkgs.example.com login bob password t0ken-xyz\n")
    inputs = build_inputs(spec, AMD, IndexOptions(), ())
    assert inputs.extra_index_urls == ("https://pkgs.example.com/simple",)
    assert inputs.secret_env == {
        "UV_EXTRA_INDEX_URL": "https://pkgs.example.com/simple",
        "PIP_EXTRA_INDEX_URL": "https://pkgs.example.com/simple",
    }
    # An index line without credentials needs nothing up front (netrc may serve it).
    no_netrc.unlink()
    plain = write_model(
        tmp_path / "plain",
        PYFUNC_SKLEARN,
        {"requirements.txt": "--index-url https://pkgs.example.com/simple\nmlflow==3.17.2\n"},
    )
    assert build_inputs(read_spec(plain), AMD, IndexOptions(), ()).index_url == (
        "https://pkgs.example.com/simple"
    )


def test_a_direct_url_is_refused_with_the_line_and_what_to_do(tmp_path: Path) -> None:
    root = write_model(
        tmp_path / "m",
        PYFUNC_SKLEARN,
        {
            "requirements.txt": (
                "mlflow==3.17.2\n"
                "somepkg @ https://files.example.com/dist/somepkg-1.0-py3-none-any.whl\n"
            )
        },
    )
    with pytest.raises(UnsupportedRequirementError) as info:
        build_inputs(read_spec(root), AMD, IndexOptions(), ())
    assert info.value.exit_code == 14
    assert str(info.value.message).startswith(
        "requirements.txt:2: 'somepkg @ https://files.example.com/dist/somepkg-1.0-py3-none-any"
        ".whl' installs somepkg from a URL"
    )
    assert "somepkg-1.0-py3-none-any.whl" in (info.value.hint or "")
    assert "--wheel-dir" in (info.value.hint or "")
    # A source URL (git, sdist) cannot be matched to a wheel: publish or embed one instead.
    git = write_model(
        tmp_path / "git",
        PYFUNC_SKLEARN,
        {"requirements.txt": f"tool @ git+https://ci:{MODEL_SECRET}@git.example.com/tool.git\n"},
    )
    with pytest.raises(UnsupportedRequirementError, match=r"requirements.txt:1: .*from a URL") as e:
        build_inputs(read_spec(git), AMD, IndexOptions(), ())
    assert "package index" in (e.value.hint or "")
    assert "add_libraries_to_model" in (e.value.hint or "")
    assert MODEL_SECRET not in str(e.value)


def test_a_direct_url_to_a_wheel_is_locked_from_the_users_copy(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "mine", "somepkg", "1.0", {"somepkg/__init__.py": ""})
    root = write_model(
        tmp_path / "m",
        PYFUNC_SKLEARN,
        {
            "requirements.txt": (
                "somepkg[fast] @ https://files.example.com/somepkg-1.0-py3-none-any.whl"
                " ; python_version >= '3.8'\n"
                f"local @ file://{tmp_path / 'nowhere' / 'local-2.0-py3-none-any.whl'}\n"
            )
        },
    )
    spec = read_spec(root)
    # The file: URL's wheel does not exist here, and no --wheel-dir has it.
    with pytest.raises(UnsupportedRequirementError, match=r"requirements.txt:2: .*from a URL"):
        build_inputs(spec, AMD, IndexOptions(wheel_dirs=(wheel.parent,)), ())
    local = build_wheel(tmp_path / "nowhere", "local", "2.0", {"local/__init__.py": ""})
    inputs = build_inputs(spec, AMD, IndexOptions(wheel_dirs=(wheel.parent,)), ())
    assert inputs.model_requirements == (
        ('somepkg[fast]==1.0 ; python_version >= "3.8"', "requirements.txt:1"),
        ("local==2.0", "requirements.txt:2"),
    )
    assert set(inputs.find_links) == {wheel.parent, local.parent}
    assert {name for name, _ in inputs.local_wheels} == {wheel.name, local.name}
    # A wheel of another project under the URL's file name is not taken for it.
    other = write_model(
        tmp_path / "other",
        PYFUNC_SKLEARN,
        {"requirements.txt": "otherpkg @ https://files.example.com/somepkg-1.0-py3-none-any.whl\n"},
    )
    with pytest.raises(UnsupportedRequirementError, match="is not a wheel of otherpkg"):
        build_inputs(read_spec(other), AMD, IndexOptions(wheel_dirs=(wheel.parent,)), ())


# uv 0.13.9's and pip-compile 7.6's own words, recorded against an index on 127.0.0.1 that
# answers 401/403 to everything (tests/integration/test_lock.py runs the real thing).
UV_401 = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because mlflow-skinny was not found in the package registry and you require "
    "mlflow-skinny==2.16.2, we can conclude that your requirements are unsatisfiable.\n\n"
    "hint: An index URL (https://pkgs.example.com/simple) could not be queried due to a lack "
    "of valid authentication credentials (401 Unauthorized)\n"
)
UV_403 = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because six was not found in the package registry and you require six==1.17.0, "
    "we can conclude that your requirements are unsatisfiable.\n\n"
    "hint: An index (https://pkgs.example.com/simple) returned a 403 Forbidden error. Check "
    "that the index URL is correct and the credentials are valid.\n"
)
PIP_401 = (
    "  WARNING: 401 Error, Credentials not correct for https://pkgs.example.com/simple/six/\n"
    "  ERROR: Could not find a version that satisfies the requirement six==1.17.0 (from "
    "versions: none)\n"
    "pip._internal.exceptions.DistributionNotFound: No matching distribution found for "
    "six==1.17.0\n"
)
UV_FILE_401 = (
    "error: Failed to download `six==1.17.0`\n"
    "  cause: HTTP status client error (401 Unauthorized) for url "
    "(https://pkgs.example.com/files/six-1.17.0-py2.py3-none-any.whl)\n"
)
UV_CONFLICT = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because you require uvicorn==0.20.0 and uvicorn>=0.30, we can conclude that "
    "your requirements are unsatisfiable.\n"
)
UV_MISSING_VERSION = (
    "error: No solution found when resolving dependencies\n"
    "  cause: Because there is no version of mlflow-skinny==9.9.9 and you require "
    "mlflow-skinny==9.9.9, we can conclude that your requirements are unsatisfiable.\n"
)


class FailingResolver:
    """A resolver that fails the way the real tool did (its scrubbed output)."""

    name: ResolverName = "uv"

    def __init__(self, output: str) -> None:
        self.output = output

    def identity(self) -> str:
        return "uv 0.13.9 (fake)"

    def compile(self, inputs: LockInputs, work: Path) -> str:
        raise CommandFailedError(
            f"locking with uv failed (exit 1):\n{self.output}", output=self.output
        )


def _inputs(model: tuple[str, ...], *, extra_index_urls: tuple[str, ...] = ()) -> LockInputs:
    return LockInputs(
        target=AMD,
        model_requirements=tuple((r, f"requirements.txt:{i}") for i, r in enumerate(model, 1)),
        server_requirements=("mlflow-skinny>=2.9", "uvicorn>=0.30"),
        constraints=(),
        index_url=None,
        extra_index_urls=extra_index_urls,
        find_links=(),
        local_wheels=(),
    )


def _failure(output: str, inputs: LockInputs, tmp_path: Path) -> PackagerError:
    with pytest.raises(PackagerError) as info:
        lock(inputs, FailingResolver(output), cache_root=tmp_path / "cache")
    return info.value


@pytest.mark.parametrize(
    ("output", "status"),
    [
        (UV_401, "401 Unauthorized"),
        (UV_403, "403 Forbidden"),
        (PIP_401, "401 Unauthorized"),
        (UV_FILE_401, "401 Unauthorized"),
    ],
)
def test_an_index_refusal_is_an_auth_error_not_a_conflict(
    tmp_path: Path, output: str, status: str
) -> None:
    """mlflow-skinny is on both sides and in uv's output: still no 'conflict'."""
    inputs = _inputs(
        ("mlflow-skinny==2.16.2", "six==1.17.0"),
        extra_index_urls=("https://pkgs.example.com/simple",),
    )
    error = _failure(output, inputs, tmp_path)
    assert isinstance(error, IndexAuthError), error
    assert error.exit_code == 22
    assert error.message == (
        f"the package index https://pkgs.example.com/simple answered {status}: no credentials "
        "were given with its URL, and netrc has none it accepts (while locking with uv)"
    )
    assert "--extra-index-url" in (error.hint or "")
    assert "conflict" not in str(error)
    # Credentials the user gave, refused: said so, and never shown.
    given = _inputs(
        ("six==1.17.0",), extra_index_urls=("https://bob:t0ken-xyz@pkgs.example.com/simple",)
    )
    error = _failure(output, given, tmp_path)
    assert isinstance(error, IndexAuthError)
    assert "it refused the credentials given with its URL" in error.message
    assert "t0ken-xyz" not in str(error)


def test_an_unknown_wording_of_a_refusal_is_still_an_auth_error(tmp_path: Path) -> None:
    inputs = _inputs(("six==1.17.0",), extra_index_urls=("https://pkgs.example.com/simple",))
    error = _failure("error: the index said: 403 Forbidden, go away\n", inputs, tmp_path)
    assert isinstance(error, IndexAuthError)
    assert error.message.startswith(
        "a package index (https://pkgs.example.com/simple) refused packager (401/403) while "
        "locking with uv:\nerror: the index said: 403 Forbidden"
    )


def test_a_conflict_names_both_sides_only_when_the_pins_disagree(tmp_path: Path) -> None:
    error = _failure(UV_CONFLICT, _inputs(("uvicorn==0.20.0",)), tmp_path)
    assert isinstance(error, ResolutionError)
    assert error.message == (
        "the model's requirements conflict with the scoring server's:\n"
        "  the model requires uvicorn==0.20.0 (requirements.txt:1); packager_server requires "
        "uvicorn>=0.30"
    )
    # mlflow-skinny==9.9.9 is inside the server's >=2.9: the version is missing, no clash.
    error = _failure(UV_MISSING_VERSION, _inputs(("mlflow-skinny==9.9.9",)), tmp_path)
    assert isinstance(error, ResolutionError)
    assert error.message.startswith("the requirements cannot be resolved with uv:")
    assert "no version of mlflow-skinny==9.9.9" in error.message
