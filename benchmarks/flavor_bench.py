"""What each framework's serving mode costs: start-up and memory of 1 vs 4 workers.

    .venv/bin/python benchmarks/flavor_bench.py [--flavors xgboost keras ...] [--json out.json]

The models are tests/fixtures/flavor_models.py's (XGBoost, LightGBM, Keras on TensorFlow and
on Keras 3, ONNX, statsmodels OLS and ARIMA, PyTorch, a transformers pipeline), saved and
served by the flavor environment's interpreter (.venv-flavors: `scripts/check` or
`source scripts/lib.sh && ensure_venv && ensure_flavor_venv` creates it). For each model,
packager_server runs with ``--serving-mode auto`` (the default) and 1, then 4 workers; the
script reports:

* the serving mode the server chose (``fork``: the model is loaded once and workers share
  its pages; ``spawn``: each worker loads its own copy, for runtimes whose threads do not
  survive a fork), read from ``/metrics``;
* seconds from start to the first 200 on ``/ping`` (ready), and to every worker serving
  (in spawn mode each worker logs when its copy is loaded; forked workers serve at once);
* memory: PSS of the whole process tree once every worker served a few requests, and the
  4-worker / 1-worker ratio;
* the floor: a bare ``python -c "import mlflow.pyfunc; load_model(...)"`` in the same
  environment.

Nothing here asserts: the numbers depend on the machine. The README's table comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.server_bench import free_port, server, tree_pss_bytes  # noqa: E402
from tests.fixtures.flavor_models import MODELS  # noqa: E402

FLAVOR_PYTHON = ROOT / ".venv-flavors" / "bin" / "python"
FLAVORS = list(MODELS)  # the flavor test models, in their order
ENV = {
    **os.environ,
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
ALL_SERVING_DEADLINE = 600.0
WARM_REQUESTS = 40


def save_models(out: Path, names: list[str]) -> None:
    script = ROOT / "tests" / "fixtures" / "flavor_models.py"
    subprocess.run(
        [str(FLAVOR_PYTHON), str(script), str(out), *names],
        check=True,
        env=ENV,
        stdout=subprocess.DEVNULL,
    )


def load_floor_seconds(model_dir: Path) -> float:
    """A fresh flavor-venv interpreter importing MLflow and loading the model, nothing else."""
    code = (
        "import mlflow.pyfunc; "
        f"mlflow.pyfunc.load_model({str(model_dir)!r}, suppress_warnings=True); "
        "print('loaded', flush=True)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(FLAVOR_PYTHON), "-c", code],
        capture_output=True,
        env=ENV,
        check=False,
        timeout=ALL_SERVING_DEADLINE,
    )
    seconds = time.monotonic() - started
    if b"loaded" not in result.stdout:
        raise RuntimeError(f"load_model failed for {model_dir}: {result.stderr[-2000:]!r}")
    return seconds


def _post(port: int, body: bytes) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status)


def one_run(model_dir: Path, workers: int, log: Path) -> dict[str, Any]:
    port = free_port()
    command = [
        str(FLAVOR_PYTHON), "-m", "packager_server", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--no-access-log",
    ]  # fmt: skip
    started = time.monotonic()
    with server(command, port, log) as (ready_seconds, pid):
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        found = re.search(rb'packager_serving_mode\{[^}]*mode="(\w+)"', metrics)
        mode = found.group(1).decode() if found else "unknown"
        if mode == "spawn":  # wait for every worker's own load
            while log.read_text().count("loaded the model in") < workers:
                if time.monotonic() - started > ALL_SERVING_DEADLINE:
                    raise TimeoutError(f"not every worker of {model_dir.name} served in time")
                time.sleep(0.05)
        all_seconds = time.monotonic() - started
        body = (model_dir / "serving_input_example.json").read_bytes()
        with ThreadPoolExecutor(workers * 2) as pool:
            statuses = list(pool.map(lambda _: _post(port, body), range(WARM_REQUESTS)))
        if set(statuses) != {200}:
            raise RuntimeError(f"{model_dir.name}: statuses {sorted(set(statuses))}")
        pss = tree_pss_bytes(pid)
    return {
        "mode": mode,
        "ready_seconds": ready_seconds,
        "all_serving_seconds": all_seconds,
        "pss_bytes": pss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavors", nargs="+", choices=FLAVORS, default=FLAVORS)
    parser.add_argument("--starts", type=int, default=1, help="runs per flavor and worker count")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not FLAVOR_PYTHON.exists():
        sys.exit(f"{FLAVOR_PYTHON} is missing: run scripts/check, or ensure_flavor_venv")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_models(work / "models", args.flavors)
        for name in args.flavors:
            model_dir = work / "models" / name
            row: dict[str, Any] = {"floor_seconds": load_floor_seconds(model_dir)}
            for workers in (1, 4):
                runs = [
                    one_run(model_dir, workers, work / f"{name}-{workers}-{i}.log")
                    for i in range(args.starts)
                ]
                row[f"w{workers}"] = {
                    "mode": runs[0]["mode"],
                    **{
                        key: statistics.median(r[key] for r in runs)
                        for key in ("ready_seconds", "all_serving_seconds", "pss_bytes")
                    },
                }
            results[name] = row
            print(json.dumps({name: row}), file=sys.stderr, flush=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict[str, Any]) -> None:
    header = (
        f"{'flavor':18} {'mode':>6} {'floor s':>8} {'ready 1w':>9} {'ready 4w':>9} "
        f"{'all 4w':>7} {'PSS 1w MiB':>11} {'PSS 4w MiB':>11} {'4w/1w':>6}"
    )
    print(header)
    for name, r in results.items():
        one, four = r["w1"], r["w4"]
        print(
            f"{name:18} {four['mode']:>6} {r['floor_seconds']:8.2f} "
            f"{one['ready_seconds']:9.2f} {four['ready_seconds']:9.2f} "
            f"{four['all_serving_seconds']:7.2f} {one['pss_bytes'] / 2**20:11.0f} "
            f"{four['pss_bytes'] / 2**20:11.0f} {four['pss_bytes'] / one['pss_bytes']:6.2f}"
        )


if __name__ == "__main__":
    main()
