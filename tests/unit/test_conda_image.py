"""How a conda part shapes an image, before anything is built: the context, the Dockerfile,
the environment and the venv's interpreter (the layer itself: test_conda_lock.py; images:
tests/image/test_conda_images.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.env.lock import Lock
from packager.env.target import Target
from packager.env.wheelhouse import Wheelhouse
from packager.errors import ModelFormatError
from packager.image import wheelinstall
from packager.image.condalayer import CondaPart
from packager.image.layers import Layer
from packager.reference import parse_reference
from packager.source import fetch_model
from packager.spec import read_spec
from packager.stage import CONDA_CONTEXT_FILE, VENV, BuildPlan, plan_context, write_context
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model


def conda(tmp_path: Path, python: str | None) -> CondaPart:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(b"a layer")
    return CondaPart(
        layer=Layer(digest="sha256:" + "1" * 64, size=7, path=tar, comment="/opt/conda"),
        prefix="/opt/conda",
        python=python,
        packages=("libacme=1.0=0",),
    )


def plan(tmp_path: Path, part: CondaPart | None, python: str = "3.11") -> BuildPlan:
    sourced = fetch_model(parse_reference(str(write_model(tmp_path / "model", PYFUNC_SKLEARN))))
    lock = Lock(
        target=Target.make(python),
        resolver="uv",
        inputs_digest="sha256:0",
        index_url=None,
        extra_index_urls=(),
        packages=(),
    )
    return plan_context(
        read_spec(sourced.path, sourced.files),
        sourced.provenance,
        lock,
        Wheelhouse(files=(), downloaded=0),
        base_image="packager-base:3.11",
        conda=part,
    )


def test_a_conda_python_becomes_the_venvs_interpreter_in_both_backends(tmp_path: Path) -> None:
    built = plan(tmp_path, conda(tmp_path, "3.11"))
    assert built.venv_python == "/opt/conda/bin/python3.11"
    environment = dict(built.environment)
    assert environment["PATH"].split(":")[:3] == [
        f"{VENV}/bin",
        "/opt/conda/bin",
        "/usr/local/sbin",
    ]
    assert environment["LD_LIBRARY_PATH"] == "/opt/conda/lib"
    lines = built.dockerfile.splitlines()
    install = next(i for i, line in enumerate(lines) if "wheelinstall.py" in line)
    command = " ".join(lines[install : install + 4])
    assert "--base-python '/opt/conda/bin/python3.11' --system-site-packages" in command
    # The layer is unpacked by ADD before the venv, which links to its interpreter.
    add = lines.index(f"ADD {CONDA_CONTEXT_FILE} /")
    assert add < lines.index(f"COPY --from=dependencies {VENV} {VENV}")
    context = tmp_path / "context"
    write_context(built, context)
    assert (context / CONDA_CONTEXT_FILE).read_bytes() == b"a layer"


def test_a_conda_part_without_python_keeps_the_bases_interpreter(tmp_path: Path) -> None:
    built = plan(tmp_path, conda(tmp_path, None))
    assert built.venv_python is None
    assert "--base-python" not in built.dockerfile
    assert "--system-site-packages" not in built.dockerfile
    assert f"ADD {CONDA_CONTEXT_FILE} /" in built.dockerfile
    assert dict(built.environment)["LD_LIBRARY_PATH"] == "/opt/conda/lib"


def test_no_conda_part_no_conda_anything(tmp_path: Path) -> None:
    built = plan(tmp_path, None)
    assert "conda" not in built.dockerfile.lower()
    assert "LD_LIBRARY_PATH" not in dict(built.environment)
    assert not any(f.destination.startswith("conda/") for f in built.files)


def test_a_conda_python_other_than_the_locks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"provides Python 3\.12, but the lock's pip part"):
        plan(tmp_path, conda(tmp_path, "3.12"), python="3.11")


def test_the_venv_sees_the_conda_site_packages_only_when_asked(tmp_path: Path) -> None:
    wheelinstall.write_skeleton(tmp_path / "a", "3.11", "/usr/bin/python3.11")
    wheelinstall.write_skeleton(
        tmp_path / "b", "3.11", "/opt/conda/bin/python3.11", system_site_packages=True
    )
    assert (tmp_path / "a/pyvenv.cfg").read_text() == (
        "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n"
        "executable = /usr/bin/python3.11\n"
    )
    assert (tmp_path / "b/pyvenv.cfg").read_text() == (
        "home = /opt/conda/bin\ninclude-system-site-packages = true\nversion = 3.11\n"
        "executable = /opt/conda/bin/python3.11\n"
    )
    assert (tmp_path / "b/bin/python").readlink() == Path("/opt/conda/bin/python3.11")
