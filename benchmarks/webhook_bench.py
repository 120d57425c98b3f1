"""Load the webhook receiver on loopback: nothing lost, nothing twice, answers fast.

    .venv/bin/python benchmarks/webhook_bench.py [--deliveries N] [--clients N]
        [--processes P] [--rate R] [--json FILE]

Starts ``packager webhook serve`` as its own process with ``--dispatch k8s-jobs:DIR`` (the
real dispatcher: it writes one Job manifest per release, so the worker's cost is a file,
not a build) and one worker. ``--clients`` keep-alive connections, spread over
``--processes`` client processes (one interpreter's lock shared by 20 sending threads
delayed their own clocks by about as much as the receiver took), send signed
``model_version_alias.created`` deliveries, built before the clock starts and signed as
they are sent (all processes start together once every one has built its share); every
tenth a client sends is a resend of its previous delivery (same id, timestamp and
signature, as MLflow's own retry sends it), which must be acknowledged and queued no
second time. By default each client sends its next delivery as soon as it has the answer
(a closed loop: the receiver saturated, so latency is mostly queueing behind the other
clients); ``--rate R`` instead makes R deliveries per second in all due at fixed times
(an open loop), each latency counted from when its delivery was due. Then it waits for
the queue to drain and counts, from the queue and the manifests:

* lost: a delivery answered 2xx whose release never completed (or got a non-2xx answer);
* duplicated: a release (model → image) completed more than once, or a resend queued again;
* p50 / p99 / max of the answer latency (goal: p99 < 50 ms): the request path only
  verifies, plans and commits (SQLite WAL, ``synchronous=FULL``), never builds.

Nothing here asserts: the numbers depend on the machine (its disk's fsync above all).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import queue as queue_module
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from packager.webhook.queue import JobQueue
from packager.webhook.signature import sign

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + uuid.uuid4().hex
RULES = """\
rules:
  - models: "bench-*"
    aliases: [champion]
    image: "registry.example.com/bench/{name}:{version}"
    release: {test: false}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, process: subprocess.Popen[bytes], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the receiver exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the receiver did not become ready")


def _deliveries(n: int, count: int) -> list[tuple[str, bytes, bool]]:
    """Client ``n``'s deliveries (id, body, is a resend), built before the clock starts:
    MLflow builds its own in its own process. Every tenth is a resend of the one before
    (MLflow's retry: the same id, timestamp, signature and body)."""
    out: list[tuple[str, bytes, bool]] = []
    for i in range(count):
        if i % 10 == 9 and out:
            out.append((out[-1][0], out[-1][1], True))
            continue
        data = {"name": f"bench-{n}-{i}", "alias": "champion", "version": "1"}
        body = json.dumps(
            {
                "entity": "model_version_alias",
                "action": "created",
                "timestamp": "2026-12-02T00:00:00Z",
                "data": data,
            }
        ).encode()
        out.append((str(uuid.uuid4()), body, False))
    return out


class Client(threading.Thread):
    """One keep-alive connection sending its deliveries one after another: as fast as
    answers come (``interval`` 0, a closed loop), or one every ``interval`` seconds from
    the start (an open loop: the latency counts from when a delivery was due, so a slow
    answer that delays the next send is not hidden). Each delivery is signed when it is
    sent (an HMAC: microseconds), so a long run's timestamps stay inside the receiver's
    5-minute window."""

    def __init__(  # noqa: PLR0917 - a client's share of the load
        self, n: int, port: int, count: int, interval: float, secret: str, go: Any
    ) -> None:
        super().__init__(name=f"client-{n}")
        self.n, self.port, self.interval, self.secret, self.go = n, port, interval, secret, go
        self.requests = _deliveries(n, count)
        self.start_at = 0.0
        self.latencies: list[float] = []
        self.answers: dict[str, int] = {}
        self.failures = 0
        self.unique = {delivery_id for delivery_id, _, _ in self.requests}

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        # Spread the clients' first sends over one interval.
        offset = self.interval * (self.n * 0.618034 % 1)
        headers: dict[str, str] = {}
        for i, (delivery_id, body, resend) in enumerate(self.requests):
            due = self.start_at + offset + i * self.interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not resend:
                stamp = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    "X-MLflow-Delivery-Id": delivery_id,
                    "X-MLflow-Timestamp": stamp,
                    "X-MLflow-Signature": sign(self.secret, delivery_id, stamp, body),
                }
            started = due if self.interval else time.monotonic()
            try:
                connection.request("POST", "/webhook/mlflow", body=body, headers=headers)
                response = connection.getresponse()
                answer = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError):
                self.failures += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            self.latencies.append(time.monotonic() - started)
            key = answer.get("status", f"http {response.status}")
            self.answers[key] = self.answers.get(key, 0) + 1
        connection.close()


def _client_process(  # noqa: PLR0917 - a process's share of the load
    first: int,
    threads: int,
    port: int,
    count: int,
    interval: float,
    secret: str,
    ready: Any,
    go: Any,
    start: Any,
    out: Any,
) -> None:
    """``threads`` clients in this process. Once their deliveries are built it says so on
    ``ready``, waits for ``go`` and reads the common start time from ``start``; the
    results go back through ``out``. (The secret is passed: a spawned process draws its
    own module-level one.)"""
    clients = [Client(first + n, port, count, interval, secret, go) for n in range(threads)]
    ready.put(first)
    go.wait()
    for client in clients:
        client.start_at = start.value
        client.start()
    for client in clients:
        client.join()
    out.put(
        [
            {
                "latencies": c.latencies,
                "answers": c.answers,
                "failures": c.failures,
                "unique": sorted(c.unique),
            }
            for c in clients
        ]
    )


def _results(out: Any, workers: list[Any]) -> list[dict[str, Any]]:
    """Every client's results; an error if a client process died before sending them."""
    results: list[dict[str, Any]] = []
    pending = len(workers)
    while pending:
        try:
            results += out.get(timeout=5)
            pending -= 1
        except queue_module.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a client process died (exit code {dead[0].exitcode})"
                ) from None
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load(
    port: int, deliveries: int, clients: int, processes: int, rate: float
) -> tuple[list[Any], float, int]:
    """Send every delivery; (each client's results, the start time, client processes)."""
    # Clients in several processes: one interpreter's lock shared by 20 sending
    # threads delayed their own timestamps by as much as the receiver took.
    per_client = deliveries // clients
    interval = clients / rate if rate else 0.0
    context = multiprocessing.get_context("spawn")
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    start_value = context.Value("d", 0.0)
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    workers = [
        context.Process(
            target=_client_process,
            args=(first, share, port, per_client, interval, SECRET, ready, go, start_value),
            kwargs={"out": out},
        )
        for first, share in zip(firsts, shares, strict=True)
        if share
    ]
    for worker in workers:
        worker.start()
    for _ in workers:  # every client process has built its deliveries
        ready.get(timeout=300)
    start = time.monotonic() + 0.2
    start_value.value = start
    go.set()
    threads = [SimpleNamespace(**r) for r in _results(out, workers)]
    for worker in workers:
        worker.join()
    return threads, start, len(workers)


def run(
    deliveries: int, clients: int, workdir: Path, *, processes: int, rate: float
) -> dict[str, object]:
    rules, queue, jobs = workdir / "rules.yaml", workdir / "queue.db", workdir / "jobs"
    rules.write_text(RULES)
    port = free_port()
    argv = [sys.executable, "-m", "packager", "webhook", "serve", "--rules", str(rules)]
    argv += ["--secret-env", "BENCH_SECRET", "--port", str(port), "--queue", str(queue)]
    argv += ["--dispatch", f"k8s-jobs:{jobs}", "--dispatch-image", "registry.example.com/p:1"]
    argv += ["--reconcile-interval", "0"]
    env = {**os.environ, "BENCH_SECRET": SECRET, "MLFLOW_TRACKING_URI": ""}
    log = (workdir / "serve.log").open("wb")
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, process)
        threads, start, launched = _load(port, deliveries, clients, processes, rate)
        sending = time.monotonic() - start
        unique = sum(len(t.unique) for t in threads)
        reader = JobQueue(queue, owner=False)
        try:
            end = time.monotonic() + 300
            while time.monotonic() < end:
                counts = reader.counts()
                if counts["done"] + counts["parked"] >= unique or process.poll() is not None:
                    break
                time.sleep(0.2)
            drained = time.monotonic() - start
            done = reader.jobs("done")
            counts = reader.counts()
        finally:
            reader.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
    keys = [job.spec.key for job in done]
    latencies = [x for t in threads for x in t.latencies]
    answers: dict[str, int] = {}
    for thread in threads:
        for key, n in thread.answers.items():
            answers[key] = answers.get(key, 0) + n
    manifests = len(list(jobs.glob("*.yaml"))) if jobs.is_dir() else 0
    return {
        "deliveries": sum(len(t.latencies) + t.failures for t in threads),
        "clients": clients,
        "client_processes": launched,
        "rate_per_s": rate or "as fast as answered (closed loop)",
        "unique_deliveries": unique,
        "answers": answers,
        "transport_failures": sum(t.failures for t in threads),
        "jobs": counts,
        "manifests": manifests,
        "lost": unique - len(set(keys)) + sum(t.failures for t in threads),
        "duplicated": (len(keys) - len(set(keys))) + (answers.get("queued", 0) - unique),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "send_seconds": round(sending, 2),
        "drain_seconds": round(drained, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--processes", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="deliveries per second in all, each due at its time (default 0: every "
        "client sends its next as soon as it has the answer)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        result = run(
            args.deliveries,
            args.clients,
            Path(tmp),
            processes=max(1, min(args.processes, args.clients)),
            rate=args.rate,
        )
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
