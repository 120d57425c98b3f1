from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ALL_ERRORS
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model


def test_help_shows_examples_and_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "packager inspect models:/wine@champion" in out
    for cls in ALL_ERRORS:
        assert f"{cls.exit_code:<4} {cls.__name__}" in out
    assert len({cls.exit_code for cls in ALL_ERRORS}) == len(ALL_ERRORS)


def test_inspect_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    assert "packager inspect models:/wine/Production" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_local_model_human_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_model(tmp_path / "model", PYFUNC_SKLEARN)
    assert main(["inspect", str(root)]) == 0
    human = capsys.readouterr().out
    assert "Python     3.11.7" in human
    assert "Flavors    python_function, sklearn 1.5.2 [cloudpickle]" in human
    assert "Signature  none" in human
    assert main(["inspect", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provenance"]["reached_through"] == "local"
    assert data["spec"]["pyfunc"]["loader_module"] == "mlflow.sklearn"


@pytest.mark.parametrize(
    ("mlmodel", "code", "message"),
    [
        (None, 5, "has no MLmodel file"),
        ("flavors: [", 5, "not valid YAML"),
        ({"flavors": {"keras": {}}}, 6, "no 'python_function' flavor"),
    ],
)
def test_bad_models_exit_with_their_code_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mlmodel: object, code: int, message: str
) -> None:
    root = write_model(tmp_path / "model", mlmodel)  # type: ignore[arg-type]
    assert main(["inspect", str(root)]) == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert main(["inspect", str(root), "--json"]) == code
    out = json.loads(capsys.readouterr().out)
    assert out["error"]["exit_code"] == code


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_model(tmp_path / "model", "flavors: [")
    assert main(["inspect", str(root), "--debug"]) == 5
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["build", "generate"])
def test_image_flags_reach_the_options(command: str) -> None:
    from packager import cli

    extra = ["-o", "out"] if command == "generate" else []
    args = cli._build_parser().parse_args(
        [command, "m", *extra, "--platform", "linux/arm64", "--keep-tests", "--no-bytecode"]
    )
    options = cli._image_options(args)
    assert options.lock.platform == "linux/arm64"
    assert options.keep_tests
    assert not options.bytecode
    defaults = cli._image_options(cli._build_parser().parse_args([command, "m", *extra]))
    assert (defaults.lock.platform, defaults.keep_tests, defaults.bytecode) == (
        "linux/amd64",
        False,
        True,
    )


def test_an_unknown_platform_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "m", "--platform", "windows/amd64"]) == 2
    assert "invalid choice: 'windows/amd64'" in capsys.readouterr().err


def test_the_default_backend_is_oci_and_docker_with_system_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from packager import api
    from packager.errors import UsageError

    seen: dict[str, object] = {}

    def fake_oci(reference: str, image: object, outputs: api.OciOutputs, **_: object) -> object:
        seen["oci"] = outputs
        raise UsageError("stop here")

    def fake_docker(reference: str, tag: str, *_: object, **__: object) -> object:
        seen["docker"] = tag
        raise UsageError("stop here")

    monkeypatch.setattr(api, "build_oci_image", fake_oci)
    monkeypatch.setattr(api, "build_image", fake_docker)
    monkeypatch.setattr(api, "engine_reachable", lambda: True)
    assert main(["build", "m", "-t", "wine:3"]) == 2
    assert seen.pop("oci") == api.OciOutputs(layout=None, archive=None, load=True, push=False)
    assert main(["build", "m", "-t", "r.example/wine:3", "--push"]) == 2
    assert seen.pop("oci") == api.OciOutputs(layout=None, archive=None, load=False, push=True)
    assert main(["build", "m", "-t", "wine:3", "--system-package", "libgomp1"]) == 2
    assert seen.pop("docker") == "wine:3"
    monkeypatch.setattr(api, "engine_reachable", lambda: False)
    assert main(["build", "m", "-t", "wine:3"]) == 2
    assert seen == {}


@pytest.mark.parametrize("python", ["2.7", "3.9", "4.0"])
def test_an_unsupported_python_is_refused_before_locking(
    python: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_model(tmp_path / "model", PYFUNC_SKLEARN)
    assert main(["lock", str(root), "--python", python, "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert f"Python {python} is not a Python an image can have" in error["message"]
    assert "--python 3.11" in error["hint"]


def test_an_unknown_flag_prints_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lock", "m", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: packager lock ")
    assert "unrecognized arguments: --no-such-flag" in err


def test_provenance_names_the_logged_model_id_the_spec_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_model(tmp_path / "model", {**PYFUNC_SKLEARN, "model_id": "m-0123abcd"})
    assert main(["inspect", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"]["model_id"] == "m-0123abcd"
    assert data["provenance"]["model_id"] == "m-0123abcd"


def test_generate_warns_about_a_base_the_engine_lacks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from packager import api

    plan = SimpleNamespace(base_image="python:3.11-slim", python="3.11", files=())
    monkeypatch.setattr(api, "generate_context", lambda *_, **__: SimpleNamespace(plan=plan))
    monkeypatch.setattr(api, "base_missing", lambda reference: reference == "python:3.11-slim")
    assert main(["generate", "m", "-o", str(tmp_path / "ctx")]) == 0
    assert "python:3.11-slim is not in the local engine" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--help"], ["packager build models:/wine@champion -t wine:3", "packager test wine:3"]),
        (["base", "--help"], ["mmdebstrap", "packager base build --python 3.11"]),
        (["build", "--help"], ["MODEL", "models:/NAME@ALIAS", "--resolver", "--lock FILE"]),
        (["test", "--help"], ["/ping", "/health", "/version", "/metrics", "/live", "/ready"]),
        (["serve", "--help"], ["--port PORT", "port to listen on", "one JSON object per line"]),
    ],
)
def test_help_describes_arguments_and_shows_examples(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in needles:
        assert " ".join(needle.split()) in text, needle


def test_lock_output_to_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    """`-o /dev/stdout` or a FIFO: a rename would replace it with a regular file."""
    import os
    import threading

    from packager.cli import _write_atomically

    fifo = tmp_path / "lock.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    _write_atomically(fifo, "numpy==2.1.3\n")
    reader.join(timeout=10)
    assert received == ["numpy==2.1.3\n"]
    assert fifo.is_fifo()
