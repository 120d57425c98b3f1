"""`packager inspect` against a real MLflow tracking server with real registered models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from tests.conftest import MlflowServer, free_port

pytestmark = pytest.mark.mlflow_server


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["inspect", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def inspect_error(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, dict[str, Any]]:
    code = main(["inspect", *args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    error: dict[str, Any] = json.loads(out)["error"]
    assert error["exit_code"] == code
    return code, err, error


@pytest.mark.parametrize(
    ("suffix", "version", "reached", "extra"),
    [
        ("/1", "1", "version", {}),
        ("/2", "2", "version", {}),
        ("@champion", "1", "alias", {"alias": "champion"}),
        ("/Production", "1", "stage", {"stage": "Production"}),
        ("/staging", "2", "stage", {"stage": "Staging"}),
        ("/latest", "2", "latest", {}),
    ],
)
def test_registry_reference_forms(  # noqa: PLR0917 - pytest passes fixtures positionally
    registry_env: MlflowServer,
    registered_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    suffix: str,
    version: str,
    reached: str,
    extra: dict[str, str],
) -> None:
    data = inspect_json(capsys, f"models:/sk-cloudpickle{suffix}")
    prov = data["provenance"]
    assert (prov["model_name"], prov["model_version"], prov["reached_through"]) == (
        "sk-cloudpickle",
        version,
        reached,
    )
    for key, value in extra.items():
        assert prov[key] == value
    assert prov["tracking_uri"] == registry_env.uri
    assert prov["mlflow_version"] == "3.17.2"
    assert prov["content_digest"].startswith("sha256:")
    assert prov["created_at"].endswith("Z")
    assert prov["run_id"]
    if version == "1":
        assert prov["current_stage"] == "Production"
        assert prov["aliases"] == ["champion"]
        assert prov["tags"] == {"team": "ml-platform"}
        assert prov["description"] == "depth-4 tree, approved for serving"
        assert prov["run_id"] == registered_models["sk-cloudpickle"]["run_id"]
    spec = data["spec"]
    assert spec["pyfunc"]["loader_module"] == "mlflow.sklearn"
    assert spec["serialization_formats"] == ["cloudpickle"]
    assert spec["python_version"].startswith("3.")
    assert [f["name"] for f in spec["signature"]["inputs"]["fields"]][:2] == [
        "alcohol",
        "malic_acid",
    ]
    assert spec["input_example"]["present"]


def test_logged_model_and_run_references(
    registry_env: MlflowServer,
    registered_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = registered_models["sk-cloudpickle"]
    by_id = inspect_json(capsys, f"models:/{model['model_id']}")
    assert by_id["provenance"]["reached_through"] == "logged_model"
    assert by_id["provenance"]["model_id"] == model["model_id"]
    by_run = inspect_json(capsys, f"runs:/{model['run_id']}/model")
    assert by_run["provenance"]["reached_through"] == "run"
    assert by_run["provenance"]["model_id"] == model["model_id"]
    by_version = inspect_json(capsys, "models:/sk-cloudpickle/1")
    # Three routes to the same logged model: the same files.
    digests = {d["provenance"]["content_digest"] for d in (by_id, by_run, by_version)}
    assert len(digests) == 1


def test_skops_model(registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]) -> None:
    data = inspect_json(capsys, "models:/sk-skops/1")
    assert data["spec"]["serialization_formats"] == ["skops"]
    assert data["spec"]["needs_skops"] is True
    assert any("skops" in w for w in data["warnings"])


def test_pyfunc_with_code_and_artifacts(
    registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data = inspect_json(capsys, "models:/pyfunc-code/1")
    spec = data["spec"]
    assert spec["pyfunc"]["loader_module"] == "mlflow.pyfunc.model"
    assert spec["pyfunc"]["python_model"] == "python_model.pkl"
    assert [(c["path"], c["kind"]) for c in spec["code"]] == [("code/textclf", "directory")]
    artifacts = {a["name"]: a for a in spec["artifacts"]}
    weights = artifacts["weights"]
    assert weights["kind"] == "file"
    weights_file = Path(spec["path"]) / weights["path"]
    assert weights["sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert json.loads(weights_file.read_text())["great"] == 3.0
    tokenizer = artifacts["tokenizer"]
    assert (tokenizer["kind"], tokenizer["files"]) == ("directory", 2)
    assert (Path(spec["path"]) / tokenizer["path"] / "vocab.txt").is_file()


def test_params_schema(registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]) -> None:
    data = inspect_json(capsys, "models:/params-model/1")
    params = {p["name"]: p for p in data["spec"]["signature"]["params"]}
    assert params["scale"]["type"] == "double"
    assert params["scale"]["default"] == 1.0
    assert params["mode"]["default"] == "plain"


def test_private_wheel_embedded_with_add_libraries_to_model(
    registry_env: MlflowServer,
    registered_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = inspect_json(capsys, "models:/private-wheel/1")
    private = [r for r in before["spec"]["requirements"] if r["kind"] == "local_wheel"]
    assert [r["name"] for r in private] == ["acme-featurizer"]
    data = inspect_json(capsys, "models:/private-wheel/2")
    wheels = data["spec"]["wheels"]
    assert wheels["platform"]
    names = {w["name"]: w for w in wheels["wheels"]}
    acme = names["acme-featurizer"]
    assert acme["tags"] == ["py3-none-any"]
    assert acme["path"] == f"wheels/{registered_models['private-wheel']['wheel']}"
    assert "mlflow" in names  # the whole closure, not just the private wheel
    lines = data["spec"]["requirements"]
    assert lines
    assert all(r["kind"] == "local_wheel" and r["exists_in_model"] for r in lines)
    assert any(e["path"] == "original_requirements.txt" for e in data["spec"]["env_files"])


def test_absolute_wheel_path_and_private_index(
    registry_env: MlflowServer,
    registered_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    private_index: Any,
) -> None:
    code = main(["inspect", "models:/abs-wheel-path/1"])
    human, err = capsys.readouterr()
    assert code == 0
    data = inspect_json(capsys, "models:/abs-wheel-path/1")
    absent = registered_models["abs-wheel-path"]["absent_wheel"]
    missing = [r for r in data["spec"]["requirements"] if r["kind"] == "local_wheel"]
    assert [(r["path"], r["absolute_path"], r["exists_in_model"]) for r in missing] == [
        (absent, True, False)
    ]
    index = [r for r in data["spec"]["requirements"] if r["kind"] == "extra_index_url"]
    assert [r["url"] for r in index] == [private_index.url]
    assert any(absent in w for w in data["warnings"])
    assert f"{absent}  [local_wheel, NOT in the model]" in human
    # The index credentials from requirements.txt appear nowhere packager writes.
    for text in (human, err, json.dumps(data)):
        assert "ci-s3cret-token" not in text
        assert "ci-user" not in text


def test_second_inspect_reuses_the_download(
    registry_env: MlflowServer, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "models:/pyfunc-code/1"]) == 0
    _, first_err = capsys.readouterr()
    assert "downloading models:/pyfunc-code/1" in first_err
    objects = list((cache_dir / "models" / "v1" / "objects").iterdir())
    assert len(objects) == 1
    assert main(["inspect", "models:/pyfunc-code/1"]) == 0
    _, second_err = capsys.readouterr()
    assert "downloading" not in second_err
    assert "using cached models:/pyfunc-code/1" in second_err
    assert list((cache_dir / "models" / "v1" / "objects").iterdir()) == objects


def test_local_directory_matches_the_registry_copy(
    registry_env: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = inspect_json(capsys, "models:/pyfunc-code/1")
    local_dir = tmp_path / "downloaded"
    shutil.copytree(remote["spec"]["path"], local_dir)
    (local_dir / "registered_model_meta").write_text(
        "model_name: pyfunc-code\nmodel_version: '1'\n"
    )
    local = inspect_json(capsys, str(local_dir))
    assert local["provenance"]["reached_through"] == "local"
    assert (local["provenance"]["model_name"], local["provenance"]["model_version"]) == (
        "pyfunc-code",
        "1",
    )
    assert local["spec"]["artifacts"] == remote["spec"]["artifacts"]
    assert local["spec"]["requirements"] == remote["spec"]["requirements"]


# -- errors ---------------------------------------------------------------------------


def test_unknown_version_lists_versions_and_aliases(
    registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, error = inspect_error(capsys, "models:/sk-cloudpickle/99")
    assert code == 3
    assert "has no version 99" in error["message"]
    assert "1 (Production, @champion)" in error["hint"]
    assert "2 (Staging)" in error["hint"]
    assert "aliases: @champion" in error["hint"]
    assert "hint:" in err


def test_unknown_alias(registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, error = inspect_error(capsys, "models:/sk-cloudpickle@nope")
    assert code == 3
    assert "has no alias @nope" in error["message"]
    assert "@champion" in error["hint"]


def test_empty_stage(registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, error = inspect_error(capsys, "models:/params-model/Production")
    assert code == 3
    assert "has no version in stage Production" in error["message"]


def test_unknown_model_lists_registered_models(
    registry_env: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, error = inspect_error(capsys, "models:/no-such-model/1")
    assert code == 3
    assert "'no-such-model' does not exist" in error["message"]
    assert "sk-cloudpickle" in error["hint"]


def test_unknown_run_and_logged_model(
    registry_env: MlflowServer,
    registered_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, error = inspect_error(capsys, "runs:/0123456789abcdef0123456789abcdef/model")
    assert (code, "does not exist" in error["message"]) == (3, True)
    run_id = registered_models["sk-skops"]["run_id"]
    code, _, error = inspect_error(capsys, f"runs:/{run_id}/elsewhere")
    assert code == 3
    assert "models logged by this run: model" in error["hint"]
    code, _, error = inspect_error(capsys, "models:/m-0123456789abcdef0123456789abcdef")
    assert (code, "does not exist" in error["message"]) == (3, True)


def test_unreachable_server_fails_fast_without_credentials(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://svc-user:s3cret-pass@127.0.0.1:{port}")
    started = time.monotonic()
    code, err, error = inspect_error(capsys, "models:/anything/1")
    assert code == 4
    assert time.monotonic() - started < 30  # a probe, not MLflow's minutes of retries
    assert f"http://127.0.0.1:{port}" in error["message"]
    assert "s3cret-pass" not in err + json.dumps(error)
    assert "svc-user" not in err + json.dumps(error)


def test_missing_sqlite_registry(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'typo.db'}"
    code, _, error = inspect_error(capsys, "models:/x/1", "--tracking-uri", uri)
    assert code == 4
    assert "does not exist" in error["message"]
    assert not (tmp_path / "typo.db").exists()  # and we did not create it


def test_no_tracking_uri_configured(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, error = inspect_error(capsys, "models:/x/1")
    assert code == 2
    assert "MLFLOW_TRACKING_URI" in error["hint"]


def test_console_script_end_to_end(
    registry_env: MlflowServer, cache_dir: Path, tmp_path: Path
) -> None:
    """The installed `packager` command: exit codes, stdout/stderr split, no traceback."""
    exe = Path(sys.executable).with_name("packager")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry_env.uri}
    ok = subprocess.run(
        [str(exe), "inspect", "models:/sk-skops/1", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["provenance"]["model_name"] == "sk-skops"
    assert "packager:" in ok.stderr  # logs on stderr, never mixed into the JSON
    bad = subprocess.run(
        [str(exe), "inspect", "models:/sk-skops/42"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert bad.returncode == 3
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert "has no version 42" in bad.stderr
