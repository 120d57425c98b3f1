"""Prometheus metrics shared by all worker processes, without a client library.

A scrape reaches one worker, but must count every worker's requests. The supervisor maps
one anonymous shared memory block before forking; each worker writes only its own row
(one writer per row, aligned 8-byte stores: no locks), and ``/metrics`` sums the rows.
A restarted worker takes over its predecessor's row, so counters never go backwards.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from collections.abc import Sequence

# The ``path`` label: the route, not the request's path, so its values are a fixed few.
# Vertex AI's routes are named by their variables (their paths are the deployment's
# choice); a V2 model path is labelled as its route, with or without ``versions/{version}``.
PATHS = (
    "/invocations",
    "/ping",
    "/health",
    "/version",
    "/metrics",
    "/live",
    "/livez",
    "/ready",
    "/readyz",
    "/execution-parameters",
    "AIP_PREDICT_ROUTE",
    "AIP_HEALTH_ROUTE",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/infer",
    "other",
)
STATUSES = (200, 400, 404, 405, 406, 408, 413, 415, 422, 429, 500, 503, 504, 0)  # 0: other
_V2_MODEL = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?(/ready|/infer)?$")
BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# Per (path, status): count, sum of seconds, one cumulative count per bucket.
_SERIES = 2 + len(BUCKETS)
_ROW_CELLS = len(PATHS) * len(STATUSES) * _SERIES + 2  # + worker restarts, busy-since
_BUSY = _ROW_CELLS - 2
_CELL = 8


def route_label(
    path: str, *, predict_route: str | None = None, health_route: str | None = None
) -> str:
    """The ``path`` label of a request to ``path`` (one of :data:`PATHS`)."""
    if path == predict_route:
        return "AIP_PREDICT_ROUTE"
    if path == health_route:
        return "AIP_HEALTH_ROUTE"
    if path in PATHS:
        return path
    match = _V2_MODEL.match(path)
    if match:
        return "/v2/models/{name}" + (match.group(1) or "")
    return "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SharedMetrics:
    """Request counts and latency histograms by path and status, for N worker rows."""

    def __init__(self, rows: int, fd: int | None = None) -> None:
        """``fd``: a shared memory file (``memfd``) to map, for workers that are started
        rather than forked; otherwise an anonymous block shared with forked children."""
        self.rows = rows
        size = rows * _ROW_CELLS * _CELL
        if fd is None:
            self._buffer = mmap.mmap(-1, size)  # MAP_SHARED|MAP_ANONYMOUS
        else:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)  # MAP_SHARED
        self._cells = memoryview(self._buffer).cast("d")

    @classmethod
    def in_memfd(cls, rows: int) -> tuple[SharedMetrics, int]:
        """A block that started processes can map: the metrics and the inheritable fd."""
        fd = os.memfd_create("packager-metrics", 0)  # no MFD_CLOEXEC: workers inherit it
        return cls(rows, fd), fd

    def observe(self, row: int, path: str, status: int, seconds: float) -> None:
        p = PATHS.index(path) if path in PATHS else len(PATHS) - 1
        s = STATUSES.index(status) if status in STATUSES else len(STATUSES) - 1
        base = row * _ROW_CELLS + (p * len(STATUSES) + s) * _SERIES
        cells = self._cells
        cells[base] += 1
        cells[base + 1] += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                cells[base + 2 + i] += 1

    def busy(self, row: int, since: float) -> None:
        """Mark a worker as predicting since ``since`` (time.monotonic; 0: not predicting),
        for the supervisor, which answers for a worker stuck in a prediction."""
        self._cells[row * _ROW_CELLS + _BUSY] = since

    def busy_for(self, row: int) -> float:
        """Seconds the worker has been in its current prediction (0 when idle)."""
        since = self._cells[row * _ROW_CELLS + _BUSY]
        return time.monotonic() - since if since else 0.0

    def reset_row(self, row: int) -> None:
        """Forget the per-process state of a row's worker before another takes the row.

        A worker killed mid-prediction (SIGKILL, OOM) never clears its busy mark; left
        set, the supervisor would take the idle replacement for a stuck one. Counters
        carry over.
        """
        self._cells[row * _ROW_CELLS + _BUSY] = 0.0

    def worker_restarted(self, row: int) -> None:
        self._cells[row * _ROW_CELLS + _ROW_CELLS - 1] += 1

    def _total(self, offset: int) -> float:
        return sum(self._cells[row * _ROW_CELLS + offset] for row in range(self.rows))

    def _busy_rows(self) -> int:
        return sum(1 for row in range(self.rows) if self._cells[row * _ROW_CELLS + _BUSY])

    def render(
        self,
        labels: Sequence[tuple[str, str]],
        *,
        workers: int,
        load_seconds: float,
        serving_mode: str = "fork",
    ) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        base = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        lines = [
            "# HELP packager_requests_total HTTP requests answered, by path and status.",
            "# TYPE packager_requests_total counter",
        ]
        histogram = [
            "# HELP packager_request_duration_seconds Time to answer a request.",
            "# TYPE packager_request_duration_seconds histogram",
        ]
        for p, path in enumerate(PATHS):
            for s, status in enumerate(STATUSES):
                offset = (p * len(STATUSES) + s) * _SERIES
                count = self._total(offset)
                if not count:
                    continue
                series = f'{base},path="{path}",status="{status or "other"}"'
                lines.append(f"packager_requests_total{{{series}}} {count:.0f}")
                for i, bound in enumerate(BUCKETS):
                    histogram.append(
                        f"packager_request_duration_seconds_bucket{{{series},"
                        f'le="{bound}"}} {self._total(offset + 2 + i):.0f}'
                    )
                histogram.append(
                    f'packager_request_duration_seconds_bucket{{{series},le="+Inf"}} {count:.0f}'
                )
                histogram.append(
                    f"packager_request_duration_seconds_sum{{{series}}} "
                    f"{self._total(offset + 1):.6f}"
                )
                histogram.append(f"packager_request_duration_seconds_count{{{series}}} {count:.0f}")
        restarts = self._total(_ROW_CELLS - 1)
        lines += [
            *histogram,
            "# HELP packager_workers Worker processes configured.",
            "# TYPE packager_workers gauge",
            f"packager_workers{{{base}}} {workers}",
            (
                "# HELP packager_serving_mode How workers got the model: forked from one "
                "load (fork) or each loading it (spawn)."
            ),
            "# TYPE packager_serving_mode gauge",
            f'packager_serving_mode{{{base},mode="{serving_mode}"}} 1',
            "# HELP packager_workers_busy Workers predicting right now.",
            "# TYPE packager_workers_busy gauge",
            f"packager_workers_busy{{{base}}} {self._busy_rows()}",
            "# HELP packager_worker_restarts_total Workers replaced after a crash or timeout.",
            "# TYPE packager_worker_restarts_total counter",
            f"packager_worker_restarts_total{{{base}}} {restarts:.0f}",
            "# HELP packager_model_load_seconds Time the model took to load.",
            "# TYPE packager_model_load_seconds gauge",
            f"packager_model_load_seconds{{{base}}} {load_seconds:.3f}",
        ]
        return ("\n".join(lines) + "\n").encode()


assert struct.calcsize("d") == _CELL  # noqa: S101 - a platform invariant, not input
