"""The built distribution: templates ship inside the wheel and load from it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def test_wheel_contains_templates_and_loads_them(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("mlflow_packager-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    templates = sorted(p.name for p in (ROOT / "templates").iterdir())
    for template in templates:
        assert f"packager/templates/{template}" in names
    sdist = next(dist.glob("mlflow_packager-*.tar.gz"))
    assert sdist.stat().st_size > 0
    # Import packager from the wheel (a zip on sys.path), away from the source tree.
    code = (
        f"import sys; sys.path.insert(0, {str(wheel)!r}); import packager.render as r; "
        "assert r.__file__.startswith(sys.path[0]), r.__file__; "
        "print(r.environment().get_template('inspect.txt.j2').filename or 'ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_wheel_alone_runs_every_command(dist: Path, tmp_path: Path) -> None:
    """`pip install mlflow-packager` into an empty venv: every command's imports resolve,
    and what needs more than the package (an engine, the server extra) says so."""
    wheel = next(dist.glob("mlflow_packager-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("uv")),
            *("pip", "install", "--quiet", "--python", str(python)),
            *("-c", str(ROOT / "constraints" / "dev.txt"), str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    model = write_model(tmp_path / "model", PYFUNC_SKLEARN)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PACKAGER_CACHE_DIR": str(tmp_path / "cache"),
        "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}",
    }

    def packager(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(venv / "bin" / "packager"), *argv],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )

    def clean(result: subprocess.CompletedProcess[str]) -> None:
        for text in ("ModuleNotFoundError", "this is a bug in packager", "Traceback"):
            assert text not in result.stderr, result.stderr[-3000:]

    # build: docker-py imports, and the missing engine is the error (exit 18), not a bug.
    built = packager("build", str(model), "--backend", "docker", "-t", "packager-test/x:1")
    clean(built)
    assert built.returncode == 18, built.stderr[-3000:]
    assert "no-engine.sock" in built.stderr
    # lock with pip-tools: pip-compile comes with the package. (mlflow-skinny: 52 packages
    # to resolve instead of 88; pip-compile resolved them in 67 s instead of 109 s here.)
    locked = packager(
        *("lock", str(model), "--resolver", "pip-tools", "--mlflow-skinny"),
        *("-o", str(tmp_path / "lock")),
    )
    clean(locked)
    assert locked.returncode == 0, locked.stderr[-3000:]
    assert "--hash=sha256:" in (tmp_path / "lock").read_text()
    # serve without the [server] extra: says what to install.
    served = packager("serve", str(model))
    clean(served)
    assert served.returncode == 2, served.stderr[-3000:]
    assert "pandas" in served.stderr
    assert "mlflow-packager[server]" in served.stderr
