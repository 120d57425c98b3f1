"""The built distribution: templates ship inside the wheel and load from it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_contains_templates_and_loads_them(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("mlflow_packager-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    templates = sorted(p.name for p in (ROOT / "templates").iterdir())
    for template in templates:
        assert f"packager/templates/{template}" in names
    sdist = next(tmp_path.glob("mlflow_packager-*.tar.gz"))
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
