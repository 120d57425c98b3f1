"""Benchmark conda models: lock, install and build times next to a pip-only twin.

    .venv/bin/python benchmarks/conda_bench.py [--base-image TAG]

Two models saved by MLflow with the same code and the same pip part (mlflow and pandas,
locked with ``--mlflow-skinny``), built on the same base (``packager-test-base:3.11`` by
default, built from Debian's packages when missing):

* **pip-only**: conda.yaml lists only python and pip, so it takes the pip path;
* **conda**: conda.yaml also lists the test channels' ``acme-tool`` and ``acme-py``, and
  ``python`` from a channel that repackages the base's interpreter (the channels of
  ``tests/fixtures/conda``, built here: no conda channel is reached).

For each, from an empty packager cache (uv's own cache stays warm, so PyPI's speed is not
what is measured): ``packager lock`` cold and cached, ``packager build --backend oci``
cold (lock, fetch, install, assemble) and warm (every layer from the cache), and the image
size. For the conda model alone, the install of its conda packages into ``/opt/conda``'s
layer (``packager.image.condalayer``, packages already in the cache). Then the ratios
conda / pip-only. Nothing asserts: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
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


def packager(args: list[str], cache: Path) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "packager"), *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PACKAGER_CACHE_DIR": str(cache)},
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"packager {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return elapsed, json.loads(result.stdout)


def conda_install_seconds(lock_file: Path, cache: Path) -> tuple[float, int]:
    """The conda layer made again from the cached packages, into an empty blob store."""
    from packager.env.condapkgs import fetch_conda_packages
    from packager.env.lock import read_lock
    from packager.image.blobs import BlobStore
    from packager.image.condalayer import conda_part

    conda = read_lock(lock_file).conda
    if conda is None:
        raise RuntimeError("the conda model's lock has no conda part")
    files = fetch_conda_packages(conda, cache_root=cache).files
    with tempfile.TemporaryDirectory(prefix="conda-bench-") as tmp:
        started = time.monotonic()
        part = conda_part(conda, files, BlobStore(Path(tmp)), epoch=0)
        return time.monotonic() - started, part.layer.size


def main() -> None:
    from packager.image.base import build_base
    from tests.fixtures.conda.models import build_channels, save_conda_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-image", default="packager-test-base:3.11")
    args = parser.parse_args()
    base = build_base("3.11", args.base_image).reference
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="conda-bench-") as tmp:
        work = Path(tmp)
        channels = build_channels(work / "channels", base)
        python = f"python={channels.python_version}"
        models = {
            "pip-only": (save_conda_model(work / "pip-only", [python]), []),
            "conda": (
                save_conda_model(work / "conda", [python, "acme-tool", "acme-py"]),
                channels.flags,
            ),
        }
        for name, (model, flags) in models.items():
            cache = work / f"cache-{name}"
            lock_file = work / f"{name}.lock"
            common = [str(model), "--mlflow-skinny", *flags]
            lock_cold, _ = packager(["lock", *common, "-o", str(lock_file)], cache)
            lock_cached, again = packager(["lock", *common], cache)
            if not again["cached"]:
                raise RuntimeError("the second lock was not served from the cache")
            build_cache = work / f"build-cache-{name}"
            build = ["build", *common, "--backend", "oci", "--base-image", base]
            build_cold, built = packager([*build, "-o", str(work / f"{name}-a")], build_cache)
            build_warm, rebuilt = packager([*build, "-o", str(work / f"{name}-b")], build_cache)
            if rebuilt["manifest_digest"] != built["manifest_digest"]:
                raise RuntimeError(f"{name}: the warm build gave another image")
            figures[name] = {
                "lock_cold": lock_cold,
                "lock_cached": lock_cached,
                "build_cold": build_cold,
                "build_warm": build_warm,
                "size": float(built["size_bytes"]),
            }
            if name == "conda":
                seconds, size = conda_install_seconds(lock_file, cache)
                figures[name]["install"] = seconds
                figures[name]["layer"] = float(size)
    pip, conda = figures["pip-only"], figures["conda"]
    print(f"conda test model vs its pip-only twin (base {base}, --mlflow-skinny, OCI backend)")
    print(
        f"{'':10} {'lock cold':>10} {'cached':>8} {'build cold':>11} {'warm':>7} {'image MiB':>10}"
    )
    for name, f in figures.items():
        print(
            f"{name:10} {f['lock_cold']:9.1f}s {f['lock_cached']:7.2f}s {f['build_cold']:10.1f}s "
            f"{f['build_warm']:6.1f}s {f['size'] / 2**20:10.0f}"
        )
    print(
        f"conda / pip-only: lock cold {conda['lock_cold'] / pip['lock_cold']:.2f}x, "
        f"build cold {conda['build_cold'] / pip['build_cold']:.2f}x, "
        f"build warm {conda['build_warm'] / pip['build_warm']:.2f}x"
    )
    print(
        f"conda packages installed into /opt/conda's layer: {conda['install']:.2f}s "
        f"({conda['layer'] / 2**20:.0f} MiB layer, packages from the cache)"
    )


if __name__ == "__main__":
    main()
