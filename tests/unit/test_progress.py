"""Progress on a terminal: the download bar and the Docker backend's build steps."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from packager.progress import RichBuildSteps, RichProgress


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120, color_system=None), out


def test_build_steps_drive_a_bar_and_keep_the_log() -> None:
    console, out = _terminal()
    steps = RichBuildSteps(console)
    steps("Step 1/4 : FROM packager-base:3.11 AS dependencies")
    steps(" ---> 3f2a")
    steps("Step 3/4 : COPY server/ /opt/packager/server/")
    steps("wheelinstall: installed 89 wheels into /opt/venv")
    steps.close()
    text = out.getvalue()
    assert "build step 3/4" in text
    assert "COPY server/ /opt/packager/server/" in text
    assert "wheelinstall: installed 89 wheels" in text  # other lines scroll above the bar
    steps.close()  # closing twice is harmless


def test_build_steps_without_step_lines_never_start_a_bar() -> None:
    console, out = _terminal()
    steps = RichBuildSteps(console)
    steps("Successfully built 3f2a")
    steps.close()
    assert "build step" not in out.getvalue()
    assert "Successfully built 3f2a" in out.getvalue()


def test_download_bar_counts_bytes() -> None:
    console, out = _terminal()
    bar = RichProgress(console)
    bar.start("downloading models:/wine/3", total_bytes=2048, total_files=2)
    bar.advance(1024)
    bar.advance(1024)
    bar.finish()
    text = out.getvalue()
    assert "downloading models:/wine/3 (2 files)" in text
    assert "2.0/2.0 kB" in text or "2.0 kB" in text


def test_log_progress_marks_quarters_of_large_transfers_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from packager.progress import LogProgress

    with caplog.at_level(logging.INFO, logger="packager.progress"):
        small = LogProgress()
        small.start("small", total_bytes=9 * 1024, total_files=8)
        small.advance(9 * 1024)
        small.finish()
        large = LogProgress()
        large.start("large", total_bytes=400 * 2**20, total_files=3)
        for _ in range(4):
            large.advance(100 * 2**20)
        large.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if line.startswith("small")] == [
        "small: 8 files, 9.0 KiB",
        "small: done (9.0 KiB)",
    ]
    assert [line for line in lines if line.startswith("large: ") and "%" in line] == [
        "large: 25%",
        "large: 50%",
        "large: 75%",
    ]
