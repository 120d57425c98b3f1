"""examples/ci: the release pipelines users copy must be valid for their CI system and call
packager with flags it has.

Each file is validated against its CI system's schema (check-jsonschema's vendored copies
of the GitHub workflow and GitLab CI schemas: offline), and its ``packager release`` line is
parsed by packager's own argument parser, so a renamed flag breaks this test, not a user's
pipeline.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from packager.cli import _build_parser
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "ci"
SCHEMAS = {"github-actions.yml": "vendor.github-workflows", "gitlab-ci.yml": "vendor.gitlab-ci"}


def _check_jsonschema() -> str:
    found = shutil.which("check-jsonschema") or str(
        Path(sys.executable).parent / "check-jsonschema"
    )
    assert Path(found).exists(), "check-jsonschema is a dev dependency: reinstall .venv"
    return found


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_valid_for_its_ci_system(name: str) -> None:
    result = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", SCHEMAS[name], str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: a job without runs-on is not a GitHub workflow."""
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    del workflow["jobs"]["release"]["runs-on"]
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(workflow))
    result = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", SCHEMAS["github-actions.yml"], str(broken)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0


def _commands(document: Any) -> list[str]:
    """Every shell line of the document that runs packager."""
    found: list[str] = []
    if isinstance(document, dict):
        for value in document.values():
            found += _commands(value)
    elif isinstance(document, list):
        for value in document:
            found += _commands(value)
    elif isinstance(document, str) and document.lstrip().startswith("packager "):
        found.append(document.strip())
    return found


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_packager_command_parses(name: str) -> None:
    document = yaml.safe_load((EXAMPLES / name).read_text())
    commands = _commands(document)
    assert commands, f"{name} runs no packager command"
    for line in commands:
        command = line.split(" > ", 1)[0]  # the shell's redirection of --json
        command = re.sub(r"\$\{\{[^}]*\}\}", "X", command)  # GitHub expressions
        argv = shlex.split(command)[1:]
        args = _build_parser().parse_args(argv)  # SystemExit(2) on an unknown flag
        assert args.command == "release"
        assert args.json
        assert args.alias
        assert args.attestations_dir
