"""Batch scoring: `packager_server predict` against `mlflow models predict`, on this machine.

    .venv/bin/python benchmarks/predict_bench.py [--rows 1000000] [--json out.json]

The model is the example wine classifier (as in server_bench.py: a decision tree in a
PythonModel, 13 double columns, registered in a throwaway SQLite registry). The input is a
generated CSV of ``--rows`` rows (the wine rows with noise), and one three times larger.
Both tools run in this environment (``mlflow models predict --env-manager local``); ours
with its default workers (the CPU limit). It reports:

* the floor: a fresh interpreter that imports MLflow and loads the model, nothing else;
  with our fixed cost, it bounds the speed-up: MLflow's wall over our start-up is the
  most that any scoring speed could give at that size;
* rows/s of each on the ``--rows`` file, wall time from start to exit (model loading
  included, as a user waits for it), and the ratio ours/MLflow (goal: >= 3); and the
  same without each tool's fixed cost (its time on 1,000 rows: start, imports, load);
* peak memory (PSS of the process tree, polled 20 times a second) of each on that file,
  and of ours on the file three times larger: the ratio large/small (goal: about 1, memory
  independent of the file's size). ``--mlflow-large`` also runs MLflow on the large file.

It checks that both wrote the same predictions. Nothing asserts timings: they depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
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


def write_csv(path: Path, rows: int) -> None:
    """``rows`` rows of the wine features with noise, written a block at a time."""
    import numpy as np
    from sklearn.datasets import load_wine

    features = load_wine(as_frame=True).data.astype("float64")
    rng = np.random.default_rng(0)
    base = features.to_numpy()
    with path.open("w") as out:
        out.write(",".join(features.columns) + "\n")
        left = rows
        while left:
            n = min(left, 100_000)
            block = base[rng.integers(0, len(base), n)] * rng.normal(1.0, 0.05, (n, base.shape[1]))
            np.savetxt(out, block, fmt="%.6g", delimiter=",")
            left -= n


def measured(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command``; its wall seconds and the peak PSS of its process tree."""
    from benchmarks.server_bench import tree_pss_bytes

    peak = 0
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_pss_bytes(process.pid))
                done.wait(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        code = process.wait()
        seconds = time.perf_counter() - started
        done.set()
        poller.join()
    if code != 0:
        raise SystemExit(f"{command[:4]} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_pss_mib": peak / 2**20}


def ours(model: Path, source: Path, output: Path, log: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "packager_server", "predict", "--model-dir", str(model)]
    return measured([*command, "-i", str(source), "-o", str(output)], log)


def mlflow(model: Path, source: Path, output: Path, log: Path) -> dict[str, float]:
    command = [str(BIN / "mlflow"), "models", "predict", "-m", str(model), "-t", "csv"]
    command += ["--env-manager", "local", "-i", str(source), "-o", str(output)]
    return measured(command, log)


def same_predictions(ours_csv: Path, mlflow_json: Path) -> bool:
    with ours_csv.open() as f:
        next(f)  # the header
        ours_values = [int(float(line)) for line in f]
    theirs = json.loads(mlflow_json.read_text())["predictions"]
    return ours_values == [int(v) for v in theirs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mlflow-large", action="store_true", help="MLflow on 3x rows too")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from benchmarks.server_bench import load_floor_seconds, prepare_model

    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        work = Path(tmp)
        model = prepare_model(work)
        tiny, small, large = work / "tiny.csv", work / "small.csv", work / "large.csv"
        write_csv(tiny, 1000)
        write_csv(small, args.rows)
        write_csv(large, 3 * args.rows)
        r: dict[str, Any] = {"rows": args.rows, "cpus": os.cpu_count()}
        r["input_mib"] = {
            "small": small.stat().st_size / 2**20,
            "large": large.stat().st_size / 2**20,
        }
        r["floor_seconds"] = load_floor_seconds(model)
        r["mlflow_fixed"] = mlflow(model, tiny, work / "mlflow-t.json", work / "mlflow-t.log")
        r["ours_fixed"] = ours(model, tiny, work / "ours-t.csv", work / "ours-t.log")
        r["mlflow"] = mlflow(model, small, work / "mlflow.json", work / "mlflow.log")
        r["ours"] = ours(model, small, work / "ours.csv", work / "ours.log")
        r["same_predictions"] = same_predictions(work / "ours.csv", work / "mlflow.json")
        r["ours_large"] = ours(model, large, work / "ours-large.csv", work / "ours-large.log")
        if args.mlflow_large:
            r["mlflow_large"] = mlflow(model, large, work / "mlflow-l.json", work / "mlflow-l.log")
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


def report(r: dict[str, Any]) -> None:
    rows = r["rows"]
    theirs, ours_small, ours_large = r["mlflow"], r["ours"], r["ours_large"]
    mlflow_rate = rows / theirs["seconds"]
    ours_rate = rows / ours_small["seconds"]
    print(f"{rows:,} rows ({r['input_mib']['small']:.0f} MiB CSV), {r['cpus']} CPUs")
    print(f"  mlflow models predict : {theirs['seconds']:7.1f} s  {mlflow_rate:10,.0f} rows/s")
    print(f"  packager predict      : {ours_small['seconds']:7.1f} s  {ours_rate:10,.0f} rows/s")
    print(f"  speed-up              : {ours_rate / mlflow_rate:.1f}x (goal >= 3x)")
    # Each tool's fixed cost (start, import, load) measured on 1,000 rows, taken away:
    # the rate at which rows go through once the model is loaded.
    mlflow_marginal = rows / (theirs["seconds"] - r["mlflow_fixed"]["seconds"])
    ours_marginal = rows / (ours_small["seconds"] - r["ours_fixed"]["seconds"])
    print(
        f"  start-up (1,000 rows) : mlflow {r['mlflow_fixed']['seconds']:.1f} s, "
        f"ours {r['ours_fixed']['seconds']:.1f} s"
    )
    print(
        f"  rows/s after start-up : mlflow {mlflow_marginal:,.0f}, ours {ours_marginal:,.0f}: "
        f"{ours_marginal / mlflow_marginal:.1f}x"
    )
    print(f"  floor                 : {r['floor_seconds']:.1f} s (import mlflow + load_model)")
    # However fast rows went through, ours could not finish before its fixed cost (the
    # interpreter, `import mlflow` and loading the model: the floor every MLflow loader pays).
    print(
        f"  ceiling at this size  : {theirs['seconds'] / r['ours_fixed']['seconds']:.1f}x "
        "(MLflow's wall / our start-up: the speed-up if our rows cost nothing)"
    )
    print(f"  same predictions      : {r['same_predictions']}")
    print("peak memory (PSS of the process tree)")
    print(f"  mlflow, {rows:,} rows    : {theirs['peak_pss_mib']:7.0f} MiB")
    if "mlflow_large" in r:
        print(f"  mlflow, {3 * rows:,} rows    : {r['mlflow_large']['peak_pss_mib']:7.0f} MiB")
    print(f"  ours, {rows:,} rows      : {ours_small['peak_pss_mib']:7.0f} MiB")
    print(
        f"  ours, {3 * rows:,} rows      : {ours_large['peak_pss_mib']:7.0f} MiB "
        f"({r['input_mib']['large']:.0f} MiB CSV, {3 * rows / ours_large['seconds']:,.0f} rows/s)"
    )
    ratio = ours_large["peak_pss_mib"] / ours_small["peak_pss_mib"]
    print(f"  ours, 3x rows / 1x rows : {ratio:.2f} (goal: about 1, independent of size)")


if __name__ == "__main__":
    main()
