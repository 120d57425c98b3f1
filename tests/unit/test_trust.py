"""Trust boundaries of the build inputs: nothing from outside the model, no credential and
no host path reaches a build context or an image, and bad metadata is a clear error.

Each test here failed on the code before the fix it guards (issue: trust boundaries).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import yaml

from packager.cli import main
from packager.digest import manifest
from packager.env.lock import Lock
from packager.env.target import Target
from packager.env.wheelhouse import Wheelhouse
from packager.errors import ModelFormatError
from packager.image import assemble
from packager.reference import parse_reference
from packager.source import Provenance, RegistryOptions, fetch_model
from packager.spec import read_spec
from packager.stage import BuildPlan, plan_context, write_context
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

SECRET = "s3cr3t-index-password"


def _plan(model: Path, **options: object) -> tuple[BuildPlan, Provenance]:
    sourced = fetch_model(parse_reference(str(model)), options=RegistryOptions(**options))  # type: ignore[arg-type]
    spec = read_spec(sourced.path, sourced.files)
    lock = Lock(
        target=Target.make("3.11"),
        resolver="uv",
        inputs_digest="sha256:0",
        index_url=None,
        extra_index_urls=(),
        packages=(),
    )
    plan = plan_context(
        spec,
        sourced.provenance,
        lock,
        Wheelhouse(files=(), downloaded=0),
        base_image="packager-base:3.11",
    )
    return plan, sourced.provenance


def _model(root: Path, files: dict[str, str | bytes] | None = None) -> Path:
    return write_model(root, PYFUNC_SKLEARN, files)


def _context_bytes(plan: BuildPlan, directory: Path) -> dict[str, bytes]:
    write_context(plan, directory)
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


# -- 1. symbolic links ---------------------------------------------------------------------


def test_a_link_out_of_the_model_is_an_error_naming_it(tmp_path: Path) -> None:
    outside = tmp_path / "host-secret"
    outside.write_text("root:$6$hash:19000:0:99999:7:::\n")
    outside.chmod(0o600)
    model = _model(tmp_path / "model")
    (model / "shadow").symlink_to(outside)
    with pytest.raises(ModelFormatError, match=r"shadow .*points outside the model") as info:
        _plan(model)
    assert "--skip-outside-links" in (info.value.hint or "")
    # The CLI reports it as bad input (exit 5), not as a bug.
    assert main(["inspect", str(model)]) == ModelFormatError.exit_code


@pytest.mark.parametrize("kind", ["code file", "directory", "dangling"])
def test_every_kind_of_escaping_link_is_refused(tmp_path: Path, kind: str) -> None:
    model = _model(tmp_path / "model", {"code/helper.py": "X = 1\n"})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "id_rsa").write_text("PRIVATE KEY\n")
    if kind == "code file":
        (model / "code" / "helper.py").unlink()
        (model / "code" / "helper.py").symlink_to(tmp_path / "elsewhere" / "id_rsa")
    elif kind == "directory":
        (model / "code" / "keys").symlink_to(tmp_path / "elsewhere")
    else:
        (model / "weights.bin").symlink_to(tmp_path / "gone")
    with pytest.raises(ModelFormatError, match="symbolic link"):
        manifest(model)


def test_skip_outside_links_leaves_them_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "host-secret"
    outside.write_text("HOST-ONLY-CONTENT")
    model = _model(tmp_path / "model")
    (model / "shadow").symlink_to(outside)
    with caplog.at_level(logging.WARNING):
        plan, _ = _plan(model, outside_links="skip")
    assert "skipping shadow" in caplog.text
    context = _context_bytes(plan, tmp_path / "ctx")
    assert not any(b"HOST-ONLY-CONTENT" in data for data in context.values())


def test_links_inside_the_model_are_resolved(tmp_path: Path) -> None:
    model = _model(tmp_path / "model", {"weights/w.bin": b"W" * 10})
    (model / "latest.bin").symlink_to("weights/w.bin")
    (model / "alias-dir").symlink_to("weights")
    files = {e.path: e for e in manifest(model)}
    assert files["latest.bin"].sha256 == files["weights/w.bin"].sha256
    assert "alias-dir/w.bin" in files
    plan, _ = _plan(model)
    context = _context_bytes(plan, tmp_path / "ctx")
    assert context["model/latest.bin"] == b"W" * 10
    assert not (tmp_path / "ctx" / "model" / "latest.bin").is_symlink()


def test_a_link_cycle_and_a_fifo_are_errors(tmp_path: Path) -> None:
    model = _model(tmp_path / "model", {"sub/x.txt": "x"})
    (model / "sub" / "loop").symlink_to("..")
    with pytest.raises(ModelFormatError, match="cycle"):
        manifest(model)
    (model / "sub" / "loop").unlink()
    os.mkfifo(model / "pipe")
    with pytest.raises(ModelFormatError, match="not a regular file"):
        manifest(model)


def test_a_link_planted_in_the_cache_is_not_trusted(tmp_path: Path) -> None:
    from packager.cache import ModelCache

    cache = ModelCache(tmp_path / "cache")

    def fill(directory: Path) -> None:
        _model(directory)

    stored = cache.store("identity", fill)
    (tmp_path / "outside").write_bytes((stored.path / "model.pkl").read_bytes())
    (stored.path / "model.pkl").unlink()
    (stored.path / "model.pkl").symlink_to(tmp_path / "outside")
    assert cache.lookup("identity") is None


def test_file_modes_never_widen_for_the_server_user(tmp_path: Path) -> None:
    model = _model(tmp_path / "model", {"secrets/.env": "API_KEY=abc\n", "run.sh": "#!/bin/sh\n"})
    (model / "secrets" / ".env").chmod(0o600)
    (model / "run.sh").chmod(0o700)
    plan, _ = _plan(model)
    write_context(plan, tmp_path / "ctx")
    mode = stat.S_IMODE((tmp_path / "ctx" / "model" / "secrets" / ".env").stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "ctx" / "model" / "run.sh").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ctx" / "model" / "MLmodel").stat().st_mode) == 0o644
    # The OCI backend writes the same modes into its layer.
    groups = {kind: entries for kind, _, entries in assemble._plan_groups(plan)}
    private = {e.path for e in groups["model"] if e.private}
    assert private == {"/opt/model/secrets/.env", "/opt/model/run.sh"}


def test_a_umask_077_model_is_shipped_readable(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        model = _model(tmp_path / "model")
    finally:
        os.umask(old)
    plan, _ = _plan(model)
    assert not any(f.private for f in plan.files)


# -- 2. credentials in every requirements file -------------------------------------------


def test_every_requirements_file_pip_reads_is_scrubbed(tmp_path: Path) -> None:
    private = f"--extra-index-url http://user:{SECRET}@127.0.0.1:9/simple\nacme==1.0\n"
    model = _model(
        tmp_path / "model",
        {
            "requirements.txt": "mlflow==3.17.2\n-r reqs/private.txt\n",
            "reqs/private.txt": "-c ../pins/more.in\n" + private,
            "pins/more.in": f"# mirror http://{SECRET}@127.0.0.1:9/simple\nacme<2\n",
            "python_env.yaml": "python: 3.11.7\ndependencies:\n- -r requirements.txt\n"
            "- -r extra/py-env-reqs.txt\n",
            "extra/py-env-reqs.txt": f"-i http://u:{SECRET}@127.0.0.1:9/simple\n",
        },
    )
    spec = read_spec(model)
    assert spec.requirement_files == {
        "requirements.txt",
        "reqs/private.txt",
        "pins/more.in",
        "extra/py-env-reqs.txt",
    }
    plan, _ = _plan(model)
    context = _context_bytes(plan, tmp_path / "ctx")
    assert [name for name, data in context.items() if SECRET.encode() in data] == []
    assert b"http://127.0.0.1:9/simple" in context["model/reqs/private.txt"]


# -- 4. no build-host path in labels --------------------------------------------------------


def test_labels_are_the_same_in_any_directory(tmp_path: Path) -> None:
    first, provenance = _plan(_model(tmp_path / "a" / "model"))
    second, _ = _plan(_model(tmp_path / "deeper" / "b" / "model"))
    assert first.labels == second.labels
    assert not any(str(tmp_path) in value for _, value in first.labels)
    labels = dict(first.labels)
    assert labels["io.packager.model.digest"] == provenance.content_digest
    assert provenance.source == str(tmp_path / "a" / "model")  # --json keeps the path


def test_a_local_file_registry_is_not_a_label() -> None:
    from packager.stage import _location_free

    assert _location_free("sqlite:////home/ci/mlflow.db") == ""
    assert _location_free("file:///srv/mlruns") == ""
    assert _location_free("/srv/mlruns") == ""
    assert _location_free("http://mlflow:5000") == "http://mlflow:5000"
    assert _location_free("databricks") == "databricks"


# -- 5. oversized and undecodable metadata --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("MLmodel", b"flavors: {}\nrun_id: \xff\xfe\n", "MLmodel"),
        ("requirements.txt", b"mlflow==3.17.2\n# caf\xe9\n", "requirements.txt .*not UTF-8"),
        ("registered_model_meta", b"model_name: caf\xe9\n", "registered_model_meta .*not UTF-8"),
        ("registered_model_meta", b'model_name: "a\\nRUN x"\n', "control character"),
        ("registered_model_meta", b"model_name: " + b"n" * 2_000_000 + b"\n", "characters long"),
    ],
)
def test_bad_metadata_is_a_model_format_error(
    tmp_path: Path, name: str, content: bytes, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path / "model")
    (model / name).write_bytes(content)
    with pytest.raises(ModelFormatError, match=problem):
        _plan(model)
    assert main(["inspect", str(model)]) == ModelFormatError.exit_code
    assert "this is a bug" not in capsys.readouterr().err


def test_a_hostile_directory_name_is_refused_before_building(tmp_path: Path) -> None:
    model = _model(tmp_path / "bad\x1bname")
    with pytest.raises(ModelFormatError, match="control character"):
        _plan(model)


def test_hostile_names_are_labels_byte_for_byte(tmp_path: Path) -> None:
    name = "${PATH} n${x?err} café 'q' \"d\" \\ `id`"
    model = _model(tmp_path / "model")
    (model / "registered_model_meta").write_text(
        yaml.safe_dump({"model_name": name, "model_version": "3"}), encoding="utf-8"
    )
    plan, _ = _plan(model)
    assert dict(plan.labels)["io.packager.model.name"] == name
    quoted = "'" + name.replace("'", "'\\''") + "'"
    assert f"'io.packager.model.name'={quoted}" in plan.dockerfile
