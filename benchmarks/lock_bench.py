"""Benchmark `packager lock`: uv vs pip-tools, cold and cached; full mlflow vs skinny.

    .venv/bin/python benchmarks/lock_bench.py

On the example wine model (registered in a throwaway SQLite registry), for this machine's
Python (pip-tools can only lock for the interpreter it runs in):

* lock time with each resolver, cold (empty packager cache and empty uv/pip caches, so
  every index page and file is fetched) and cached (the same model and options again);
* the ratio pip-tools/uv;
* the installed size of the lock with full mlflow and with ``--mlflow-skinny``, both
  installed from the wheelhouse into empty directories.

Nothing asserts: the figures depend on the machine and the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def packager(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "packager"), *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"packager {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return elapsed, json.loads(result.stdout)


def installed_size(lock: Path, wheelhouse: dict[str, Any], work: Path) -> int:
    wheels = work / "wheels"
    wheels.mkdir()
    for wheel in wheelhouse["files"]:
        (wheels / wheel["filename"]).symlink_to(wheel["path"])
    target = work / "site-packages"
    subprocess.run(
        [
            str(BIN / "uv"),
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            "--python",
            sys.executable,
            "--no-index",
            "--find-links",
            str(wheels),
            "--require-hashes",
            "-r",
            str(lock),
        ],
        check=True,
    )
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    from examples.register_example import register

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registered = register(work / "registry")
        base_env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"]}
        reference = registered["model"]
        times: dict[str, dict[str, float]] = {}
        for resolver in ("uv", "pip-tools"):
            caches = work / f"caches-{resolver}"
            env = {
                **base_env,
                "PACKAGER_CACHE_DIR": str(caches / "packager"),
                "UV_CACHE_DIR": str(caches / "uv"),
                "PIP_CACHE_DIR": str(caches / "pip"),
            }
            args = ["lock", reference, "--resolver", resolver]
            cold, first = packager(args, env)
            cached, second = packager(args, env)
            if not second["cached"] or first["digest"] != second["digest"]:
                raise RuntimeError("the second lock was not served from the cache")
            times[resolver] = {
                "cold": cold,
                "cached": cached,
                "resolve": float(first["seconds"]),
                "packages": float(len(first["packages"])),
            }
        sizes = {}
        env = {**base_env, "PACKAGER_CACHE_DIR": str(work / "size-cache")}
        for flavor, extra in (("full mlflow", []), ("mlflow-skinny", ["--mlflow-skinny"])):
            lock = work / f"{flavor.replace(' ', '-')}.lock"
            _, out = packager(["lock", reference, "--download", "-o", str(lock), *extra], env)
            folder = work / f"install-{flavor.replace(' ', '-')}"
            folder.mkdir()
            sizes[flavor] = (
                installed_size(lock, out["wheelhouse"], folder),
                len(out["packages"]),
            )
    print(
        f"lock of {reference} for this interpreter (Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, linux/amd64)"
    )
    print(f"{'':14} {'cold (s)':>9} {'resolve (s)':>12} {'cached (s)':>11} {'packages':>9}")
    for resolver, t in times.items():
        print(
            f"{resolver:14} {t['cold']:9.1f} {t['resolve']:12.1f} {t['cached']:11.2f} "
            f"{t['packages']:9.0f}"
        )
    print(
        f"pip-tools / uv, cold: {times['pip-tools']['cold'] / times['uv']['cold']:.1f}x; "
        f"resolve step only: {times['pip-tools']['resolve'] / times['uv']['resolve']:.1f}x"
    )
    full, skinny = sizes["full mlflow"], sizes["mlflow-skinny"]
    print(
        f"installed size: full mlflow {full[0] / 2**20:.0f} MiB ({full[1]} packages), "
        f"mlflow-skinny {skinny[0] / 2**20:.0f} MiB ({skinny[1]} packages): saves "
        f"{(full[0] - skinny[0]) / 2**20:.0f} MiB ({1 - skinny[0] / full[0]:.0%})"
    )


if __name__ == "__main__":
    main()
