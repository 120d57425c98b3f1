"""examples/register_example.py: an embedded SQLite registry, no server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from packager.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_example_registers_a_model_packager_can_inspect(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "register_example.py"), "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    registered = json.loads(result.stdout.strip().splitlines()[-1])
    assert registered["alias"] == "models:/wine-classifier@champion"
    uri = registered["tracking_uri"]
    assert main(["inspect", registered["alias"], "--tracking-uri", uri, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provenance"]["model_name"] == "wine-classifier"
    assert data["provenance"]["aliases"] == ["champion"]
    spec = data["spec"]
    assert [a["name"] for a in spec["artifacts"]] == ["tree"]
    assert len(spec["signature"]["inputs"]["fields"]) == 13
    assert {f["type"] for f in spec["signature"]["inputs"]["fields"]} == {"double"}
