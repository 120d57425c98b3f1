"""Progress on a terminal: the download bar and the Docker backend's build steps."""

from __future__ import annotations

import io

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
