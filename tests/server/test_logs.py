"""Request data in logs and errors: it cannot forge log lines, and errors do not echo it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.server.conftest import run_server

FORGED = "2026-01-01 00:00:00,000 ERROR packager_server: forged"
# A newline, a carriage return, an ANSI escape, DEL, C1 NEL, and U+2028 (a line
# separator for many log viewers), percent-encoded in the request line.
HOSTILE_PATH = "/nowhere%0A" + FORGED.replace(" ", "%20") + "%0D%1B[31m%7F%C2%85%E2%80%A8%22end"
CONTROL = {chr(c) for c in range(32)} | {"\x7f", "\x85", "\u2028", "\u2029"}


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_request_data_cannot_forge_access_log_lines(
    server_models: Path, tmp_path: Path, log_format: str
) -> None:
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", "--log-format", log_format
    ) as server:
        answer = server.request("GET", HOSTILE_PATH)
        assert answer.status == 404
        assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert "nowhere" not in answer.body.decode()  # the error does not echo the path
        assert server.request("GET", "/ping").status == 200  # logged after the first
    lines = server.stdout().splitlines()  # one per request: readiness polls, ours, /ping
    if log_format == "json":
        paths = [json.loads(line)["path"] for line in lines]
    else:
        assert all(line.startswith('127.0.0.1 "GET /') for line in lines), lines
        paths = [line.split('"')[1].split(" ", 1)[1] for line in lines]
    [path] = [path for path in paths if "nowhere" in path]
    assert paths[-1] == "/ping"
    assert not CONTROL & set(path), path  # escaped even inside JSON strings
    assert '"' not in path
    # Nothing request-made reaches the server log either.
    assert "forged" not in server.stderr()


def test_server_log_lines_cannot_be_forged_by_exception_text() -> None:
    """Text that may hold request data (arguments, exception messages) stays inside its
    record: its newlines start indented continuation lines, other controls are escaped."""
    from packager_server.logs import TextFormatter

    formatter = TextFormatter()
    error = ValueError("bad value\n" + FORGED + "\r\x1b[2K")
    record = logging.LogRecord(
        "packager_server.scoring",
        logging.ERROR,
        __file__,
        1,
        "unexpected error while scoring %s",
        ("a\nb",),
        (ValueError, error, None),
    )
    lines = formatter.format(record).split("\n")
    assert lines[0].endswith("ERROR packager_server.scoring: unexpected error while scoring a")
    assert lines[1] == "    b"
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert lines[-1].endswith("\\x0d\\x1b[2K"), lines
    assert any(FORGED in line for line in lines[1:])
    assert not any(c in CONTROL - {"\n"} for line in lines for c in line), lines
