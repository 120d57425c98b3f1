"""Benchmark packager_server against `mlflow models serve`, in one run, on this machine.

    .venv/bin/python benchmarks/server_bench.py [--seconds 10] [--json out.json]

The model is the example wine classifier (a decision tree in a PythonModel, 13 double
columns), registered in a throwaway SQLite registry; the request is its serving example
cut to one row. Both servers run one worker in this environment; the load generator is a
separate process on loopback with keep-alive connections. It reports:

* requests/s at 8 connections, and the ratio ours/MLflow (goal: >= 5);
* p50 latency at 1 connection, against the time pyfunc.predict spends inside the model
  (goal: within 0.5 ms), measured in a hot loop in this process; and against the model's
  time inside our server for the same requests (its ``Server-Timing`` header), which is
  longer: between requests the event loop, the kernel and the client run on the same
  cores and evict what the model's code had in the CPU's caches;
* start to ready (first 200 from /ping; median of --starts interleaved starts of each),
  against MLflow's and against the floor any server that loads through MLflow pays: a bare
  ``python -c "import mlflow.pyfunc; load_model(...)"`` to its last line (goal: <= 1.1x);
* memory (PSS of the whole process tree) with 4 workers vs 1 (goal: <= 1.5x).

Nothing here asserts: the numbers depend on the machine. Run it twice to see the noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_model(work: Path) -> Path:
    from examples.register_example import register
    from packager.api import inspect_model
    from packager.cache import ModelCache
    from packager.source import RegistryOptions

    registered = register(work / "registry")
    result = inspect_model(
        registered["alias"],
        options=RegistryOptions(tracking_uri=registered["tracking_uri"]),
        cache=ModelCache(work / "cache"),
    )
    return result.spec.path


def one_row_request(model_dir: Path) -> bytes:
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    example["dataframe_split"]["data"] = example["dataframe_split"]["data"][:1]
    return json.dumps(example).encode()


def in_process_times(model_dir: Path, body: bytes, n: int = 2000) -> dict[str, float]:
    """Median seconds of pyfunc.predict, and of the model's own predict inside it."""
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = infer_and_parse_data(json.loads(body), model.metadata.get_input_schema())
    from mlflow.models.utils import _enforce_schema

    enforced = _enforce_schema(frame, model.metadata.get_input_schema())

    def median(fn: Any) -> float:
        for _ in range(50):
            fn()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return {
        "pyfunc_predict": median(lambda: model.predict(frame)),
        "inside_model": median(lambda: model._predict_fn(enforced)),
    }


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[tuple[float, int]]:
    """Start a server; yield (seconds to first 200 on /ping, pid); stop it."""
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited: {log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() - started > 300:
                raise TimeoutError(f"{command[:4]} not ready after 300 s")
            time.sleep(0.05)
        yield time.monotonic() - started, process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def start_seconds(command: list[str], port: int, log: Path) -> float:
    with server(command, port, log) as (seconds, _):
        return seconds


def load_floor_seconds(model_dir: Path) -> float:
    """Seconds for a fresh interpreter to import MLflow and load the model, nothing else."""
    code = (
        "import mlflow.pyfunc, sys; "
        f"mlflow.pyfunc.load_model({str(model_dir)!r}, suppress_warnings=True); "
        "print('loaded', flush=True)"
    )
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV
    )
    if process.stdout is None:  # for the type checker: stdout is a pipe
        raise RuntimeError("no pipe to the load_model run")
    line = process.stdout.readline()
    seconds = time.monotonic() - started
    process.kill()
    process.wait()
    if line.strip() != b"loaded":
        raise RuntimeError("the bare load_model run failed")
    return seconds


class _Connection:
    """A minimal keep-alive HTTP/1.1 client on a raw socket.

    http.client spends 0.1-0.2 ms of Python per request, which would count against the
    server in the latency figures; this one sends prebuilt bytes and reads the response
    by its Content-Length.
    """

    def __init__(self, port: int, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (
            b"POST /invocations HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.buffer = b""
        self.model_ms: float | None = None  # from the last answer's Server-Timing

    def roundtrip(self) -> int:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        self.model_ms = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"server-timing":
                for metric in value.split(b","):
                    key, _, duration = metric.strip().partition(b";dur=")
                    if key == b"model":
                        self.model_ms = float(duration)
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return int(head.split(b" ", 2)[1])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def load(port: int, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    """Closed-loop load: each connection sends its next request when the last returns."""
    latencies: list[list[float]] = [[] for _ in range(connections)]
    model_ms: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    warm = _Connection(port, body)
    for _ in range(100):
        warm.roundtrip()
    warm.close()
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = _Connection(port, body)
        while time.monotonic() < stop:
            start = time.perf_counter()
            status = conn.roundtrip()
            latencies[i].append(time.perf_counter() - start)
            errors[i] += status != 200
            if conn.model_ms is not None:
                model_ms[i].append(conn.model_ms)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    flat = sorted(x for per in latencies for x in per)
    in_server = [x for per in model_ms for x in per]
    return {
        "requests_per_second": len(flat) / elapsed,
        "p50_ms": 1000 * flat[len(flat) // 2],
        "p99_ms": 1000 * flat[int(len(flat) * 0.99)],
        "errors": float(sum(errors)),
        # The model's own time inside the server (Server-Timing), when it reports one.
        "model_p50_ms": statistics.median(in_server) if in_server else float("nan"),
    }


def run_load(port: int, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    """The load generator in its own process, so it doesn't share our interpreter."""
    code = (
        f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.server_bench import load; "
        f"print(json.dumps(load({port}, sys.stdin.buffer.read(), {connections}, {seconds})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=body,
        capture_output=True,
        check=True,
        timeout=seconds + 120,
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants."""
    pids = [pid]
    children = subprocess.run(
        ["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True, check=False
    ).stdout.split()
    pids += [int(p) for p in children if int(p) != pid]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per load run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--starts", type=int, default=3, help="start-up samples per server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = prepare_model(work)
        body = one_row_request(model_dir)
        times = in_process_times(model_dir, body)
        results: dict[str, Any] = {"in_process_ms": {k: v * 1000 for k, v in times.items()}}
        mlflow_port, ours_port = free_port(), free_port()
        mlflow_cmd = [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            str(model_dir),
            "-p",
            str(mlflow_port),
            "-h",
            "127.0.0.1",
            "-w",
            "1",
            "--env-manager",
            "local",
        ]
        ours_cmd = [
            sys.executable,
            "-m",
            "packager_server",
            "--model-dir",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--no-access-log",
        ]
        ours_1 = [*ours_cmd, "--port", str(ours_port), "--workers", "1"]
        starts: dict[str, list[float]] = {"mlflow": [], "packager": [], "floor": []}
        for _ in range(args.starts):  # interleaved, so drifts in machine load hit all three
            starts["mlflow"].append(start_seconds(mlflow_cmd, mlflow_port, work / "mlflow.log"))
            starts["packager"].append(start_seconds(ours_1, ours_port, work / "ours.log"))
            starts["floor"].append(load_floor_seconds(model_dir))
        results["start_samples_seconds"] = starts
        results["load_floor_seconds"] = statistics.median(starts["floor"])
        with server(mlflow_cmd, mlflow_port, work / "mlflow.log") as _:
            results["mlflow"] = {
                "start_seconds": statistics.median(starts["mlflow"]),
                "c8": run_load(mlflow_port, body, 8, args.seconds),
                "c1": run_load(mlflow_port, body, 1, args.seconds),
            }
        with server(ours_1, ours_port, work / "ours.log") as (_, pid):
            results["packager"] = {
                "start_seconds": statistics.median(starts["packager"]),
                "c8": run_load(ours_port, body, 8, args.seconds),
                "c1": run_load(ours_port, body, 1, args.seconds),
            }
            run_load(ours_port, body, 2, 2)
            results["packager"]["pss_1_worker"] = tree_pss_bytes(pid)
        port4 = free_port()
        with server(
            [*ours_cmd, "--port", str(port4), "--workers", "4"], port4, work / "ours4.log"
        ) as (_, pid):
            run_load(port4, body, 8, 3)  # every worker serves some requests
            results["packager"]["pss_4_workers"] = tree_pss_bytes(pid)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    ours, theirs = r["packager"], r["mlflow"]
    inside = r["in_process_ms"]["inside_model"]
    rows = [
        (
            "requests/s, 8 connections",
            f"{theirs['c8']['requests_per_second']:.0f}",
            f"{ours['c8']['requests_per_second']:.0f}",
            f"{ours['c8']['requests_per_second'] / theirs['c8']['requests_per_second']:.2f}x",
            ">= 5x",
        ),
        (
            "p50 ms, 1 connection",
            f"{theirs['c1']['p50_ms']:.2f}",
            f"{ours['c1']['p50_ms']:.2f}",
            f"{theirs['c1']['p50_ms'] / ours['c1']['p50_ms']:.2f}x faster",
            "",
        ),
        (
            "p50 - time inside model (ms)",
            f"{theirs['c1']['p50_ms'] - inside:.2f}",
            f"{ours['c1']['p50_ms'] - inside:.2f}",
            "",
            "<= 0.5 ms",
        ),
        (
            "  p50 - model time in our server",
            "",
            f"{ours['c1']['p50_ms'] - ours['c1']['model_p50_ms']:.2f}",
            f"model {ours['c1']['model_p50_ms']:.2f} ms there",
            "",
        ),
        (
            "start to ready (s)",
            f"{theirs['start_seconds']:.2f}",
            f"{ours['start_seconds']:.2f}",
            f"{ours['start_seconds'] / theirs['start_seconds']:.2f} of MLflow's",
            "",
        ),
        (
            "  floor: import mlflow + load (s)",
            "",
            f"{r['load_floor_seconds']:.2f}",
            f"{r['load_floor_seconds'] / theirs['start_seconds']:.2f} of MLflow's",
            "",
        ),
        (
            "  start to ready / floor",
            "",
            "",
            f"{ours['start_seconds'] / r['load_floor_seconds']:.2f}x",
            "<= 1.1x",
        ),
        (
            "PSS 4 workers / 1 worker",
            "",
            f"{ours['pss_4_workers'] / 2**20:.0f} / {ours['pss_1_worker'] / 2**20:.0f} MiB",
            f"{ours['pss_4_workers'] / ours['pss_1_worker']:.2f}x",
            "<= 1.5x",
        ),
    ]
    print(
        f"in-process: pyfunc.predict {r['in_process_ms']['pyfunc_predict']:.2f} ms, "
        f"inside the model {inside:.2f} ms"
    )
    print(f"errors: mlflow {theirs['c8']['errors']:.0f}, packager {ours['c8']['errors']:.0f}")
    print(f"{'':32} {'mlflow':>10} {'packager':>16} {'ratio':>22} {'goal':>10}")
    for name, a, b, ratio, goal in rows:
        print(f"{name:32} {a:>10} {b:>16} {ratio:>22} {goal:>10}")


if __name__ == "__main__":
    main()
