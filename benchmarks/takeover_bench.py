"""What the supervisor's takeover (packager_server/takeover.py) costs a worker.

    .venv/bin/python benchmarks/takeover_bench.py [--rounds 9]

In this process, on the real classes: the Python a kept-alive request now runs beyond the
old busy mark (the records' stores and the in-flight bookkeeping), and a connection's two
channel messages, in the worker and in the supervisor, which reads them. The best of
--rounds rounds: the figures are floors, on a machine whose other load only adds to them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packager_server.app import ScoringApp, ServerInfo
from packager_server.config import ServerConfig
from packager_server.connections import SLOT_KEY, _end_stream
from packager_server.metrics import SharedMetrics
from packager_server.takeover import ConnectionTable, Lifeline, Takeover

REQUESTS = 200_000
CONNECTIONS = 10_000
BATCH = 50  # registrations between two reads by the supervisor


def _ignore(*_: object, **__: object) -> None:
    pass


def per_request(line: Lifeline, app: ScoringApp) -> float:
    """Seconds of what a request now does around its prediction: the app's _began and
    _ended (busy mark, in-flight bookkeeping, the record's prediction), and the record's
    marks from connections.GuardedConnection and the app."""
    scope_state = {SLOT_KEY: 0}
    started = time.perf_counter()
    for _ in range(REQUESTS):
        line.request(0)  # GuardedConnection.data_received
        slot = scope_state.get(SLOT_KEY)  # the app finds the connection's slot
        number = app._began(slot, "0123456789abcdef0123456789abcdef", "/invocations")
        app._ended(number, slot)
        line.writing(0)  # the app, before the response
        line.settled(0, outstanding=False)  # GuardedConnection.on_response_complete
    return (time.perf_counter() - started) / REQUESTS


def per_request_before(metrics: SharedMetrics) -> float:
    """Seconds of what the same request did before: two stores of the busy mark."""
    started = time.perf_counter()
    for _ in range(REQUESTS):
        metrics.busy(0, time.monotonic())
        metrics.busy(0, 0.0)
    return (time.perf_counter() - started) / REQUESTS


class _Transport:
    """What connections._end_stream asks of a transport."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> socket.socket:  # noqa: ARG002 - "socket"
        return self.sock


async def per_connection(
    line: Lifeline, takeover: Takeover, sock: socket.socket
) -> tuple[float, float]:
    """Seconds per connection: the worker's two messages and its shutdown of the socket
    (GuardedConnection.connection_made and connection_lost), the supervisor's reading."""
    worker = supervisor = 0.0
    transport = _Transport(sock)
    for _ in range(CONNECTIONS // BATCH):
        started = time.perf_counter()
        slots = [line.opened(sock.fileno()) for _ in range(BATCH)]
        for slot in slots:
            if slot is not None:
                _end_stream(transport)  # type: ignore[arg-type]
                line.closed(slot)
        worker += time.perf_counter() - started
        started = time.perf_counter()
        takeover.pump(0)
        supervisor += time.perf_counter() - started
    return worker / CONNECTIONS, supervisor / CONNECTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    table, metrics = ConnectionTable(1, capacity=BATCH * 2), SharedMetrics(1)
    takeover = Takeover(table, _ignore, _ignore)
    line = Lifeline(takeover.connect(0), table, 0)
    a, b = socket.socketpair()  # a stands for a client connection
    line.opened(a.fileno())  # slot 0, for the request rounds
    app = ScoringApp(
        scorer=cast(Any, None),  # never called
        config=ServerConfig(model_dir=Path()),
        metrics=metrics,
        row=0,
        info=ServerInfo(model_name="m", model_version="1", mlflow_version="-", load_seconds=0),
        retire=_ignore,
        lifeline=line,
    )
    rounds = [
        (
            per_request(line, app),
            per_request_before(metrics),
            *asyncio.run(per_connection(line, takeover, a)),
        )
        for _ in range(args.rounds)
    ]
    now, before, worker, supervisor = (min(column) for column in zip(*rounds, strict=True))
    print(
        f"per kept-alive request: {1e6 * (now - before):.2f} us added "
        f"({1e6 * now:.2f} us now, {1e6 * before:.2f} us before)"
    )
    print(f"per connection: {1e6 * worker:.2f} us in the worker (two messages, a shutdown)")
    print(f"per connection: {1e6 * supervisor:.2f} us in the supervisor (reading them)")
    a.close()
    b.close()


if __name__ == "__main__":
    main()
