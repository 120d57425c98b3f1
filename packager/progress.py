"""Progress reporting for long steps: downloads, and the Docker backend's build steps.

The library reports through the :class:`Progress` protocol and never prints. The CLI picks
:class:`RichProgress` when stderr is a terminal and :class:`LogProgress` otherwise (CI logs
want a few plain lines, not a redrawn bar).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as _RichBar

log = logging.getLogger(__name__)


class Progress(Protocol):
    """One task at a time: ``start``, any number of ``advance`` calls, ``finish``.

    ``advance`` may be called from worker threads.
    """

    def start(self, description: str, *, total_bytes: int, total_files: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing (library default)."""

    def start(self, description: str, *, total_bytes: int, total_files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


def human_size(nbytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - loop always returns


# Below this, a transfer takes a moment: its quarter marks would only be noise.
_QUARTERS_FROM_BYTES = 64 * 2**20


class LogProgress:
    """Plain log lines: one at start, one per quarter done (for large transfers), one at
    the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._description = ""
        self._total = 0
        self._done = 0
        self._next_mark = 25

    def start(self, description: str, *, total_bytes: int, total_files: int) -> None:
        self._description, self._total, self._done, self._next_mark = (
            description,
            total_bytes,
            0,
            25,
        )
        log.info("%s: %d files, %s", description, total_files, human_size(total_bytes))

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self._total < _QUARTERS_FROM_BYTES:
                return
            percent = 100 * self._done // self._total
            while percent >= self._next_mark and self._next_mark < 100:
                log.info("%s: %d%%", self._description, self._next_mark)
                self._next_mark += 25

    def finish(self) -> None:
        log.info("%s: done (%s)", self._description, human_size(self._done))


class RichProgress:
    """A live transfer bar on the terminal (stderr)."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._bar: _RichBar | None = None
        self._task: TaskID | None = None

    def start(self, description: str, *, total_bytes: int, total_files: int) -> None:
        self._bar = _RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(f"{description} ({total_files} files)", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._task = None, None


class RichBuildSteps:
    """The engine's build log on a terminal: a bar over Docker's ``Step N/M`` lines.

    Call it with each log line; the step lines drive the bar (and its description), every
    other line (RUN output, layer ids) scrolls above it, dimmed. ``close`` stops the bar.
    """

    _STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._bar: _RichBar | None = None
        self._task: TaskID | None = None

    def __call__(self, line: str) -> None:
        step = self._STEP.match(line)
        if step is None:
            self._console.print(line, style="dim", markup=False, highlight=False)
            return
        number, total, instruction = int(step.group(1)), int(step.group(2)), step.group(3)
        if self._bar is None:
            self._bar = _RichBar(
                TextColumn("[bold]build[/] step {task.completed:.0f}/{task.total:.0f}"),
                BarColumn(),
                TextColumn("{task.description}"),
                console=self._console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=total)
        if self._task is not None:
            self._bar.update(self._task, completed=number, description=instruction[:70])
        self._console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._task = None, None
