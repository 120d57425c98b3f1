"""Benchmark images: packager's Docker and OCI backends against `mlflow models build-docker`.

    .venv/bin/python benchmarks/image_bench.py [--skip-mlflow]

All in one run on this machine, on the example model (wine-classifier, registered in a
throwaway SQLite registry), each tool starting from empty caches of its own:

* cold build: model reference in, image in the local engine out (packager's Docker
  backend, packager's OCI backend with --load, MLflow's build-docker);
* rebuild after a new model version with the same dependencies (a second run of the
  example registers version 2), and a warm OCI rebuild with nothing changed (-o only);
* how many layers each packager rebuild wrote;
* image size as the engine reports it;
* start: `docker run` until /ping answers 200: the first start after the build, and the
  median of 3 more (interleaved across the images);
* what one Dockerfile step costs on this engine: a one-file COPY built without cache on
  the base and on packager's image (the classic builder commits a container per step, and
  on some storage drivers, e.g. fuse-overlayfs, a commit walks the whole file tree).

Both tools build on the same base image. No registry can be reached here, so it is built
from Debian's packages with packager's recipe plus what MLflow's Dockerfile needs (pip,
`python` on PATH, no PEP 668 marker) and tagged as the `python:X.Y.Z-slim` that MLflow's
Dockerfile names (only if no image has that name already). MLflow builds with
`--env-manager local`, as its docs recommend for images.

Nothing asserts: the figures depend on the machine and the network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
MODEL = "wine-classifier"
BENCH_BASE = "packager-bench-base:3.11"


MLFLOW_BUILD = [str(BIN / "mlflow"), "models", "build-docker", "--env-manager", "local"]


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=3600
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def packager(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    elapsed, out = timed([str(BIN / "packager"), *args, "--json"], env)
    return elapsed, json.loads(out)


def image_size(reference: str) -> int:
    out = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", reference],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def start_seconds(image: str, port_in_image: int = 8080) -> float:
    """docker run until GET /ping answers 200 (the container is removed afterwards)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:{port_in_image}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        deadline = started + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{image} never answered /ping")
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)


def measure_starts(images: dict[str, str], runs: int = 3) -> dict[str, tuple[float, float]]:
    """For each image: (its first start, the median of ``runs`` more), interleaved across
    the images so that drifts in machine load hit them all.

    The first start after a build reads the image's files from disk; later ones find them
    in the page cache, as a restart on the same node does. They differ by seconds here, so
    both are reported.
    """
    first = {name: start_seconds(image) for name, image in images.items()}
    later: dict[str, list[float]] = {name: [] for name in images}
    for _ in range(runs):
        for name, image in images.items():
            later[name].append(start_seconds(image))
    return {name: (first[name], statistics.median(later[name])) for name in images}


def step_seconds(image: str) -> float:
    """Seconds for the engine to build one step (COPY of a 1-byte file) on top of ``image``."""
    with tempfile.TemporaryDirectory(prefix="image-bench-step-") as tmp:
        (Path(tmp) / "one").write_text("1")
        (Path(tmp) / "Dockerfile").write_text(f"FROM {image}\nCOPY one /one\n")
        started = time.monotonic()
        built = subprocess.run(
            ["docker", "build", "--no-cache", "-q", tmp], capture_output=True, text=True, check=True
        )
        seconds = time.monotonic() - started
        subprocess.run(["docker", "rmi", built.stdout.strip()], capture_output=True, check=False)
    return seconds


def shared_base(python_full: str) -> str:
    """The one base both tools build on, also tagged ``python:X.Y.Z-slim`` for MLflow."""
    from packager.image import engine
    from packager.image.base import PACKAGES, build_base

    build_base(
        python_full,
        BENCH_BASE,
        packages=(*PACKAGES, "python3-pip", "python-is-python3"),
        hooks=(
            'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
            # MLflow's build fetches from PyPI inside the container; where the machine's
            # egress re-signs TLS with a local CA (as this one does), the base must trust it.
            (
                "for ca in /usr/local/share/ca-certificates/*.crt; do "
                '[ -e "$ca" ] && cp "$ca" "$1/usr/local/share/ca-certificates/"; done; '
                'chroot "$1" update-ca-certificates >/dev/null'
            ),
        ),
    )
    alias = f"python:{python_full}-slim"
    client = engine.connect()
    if not engine.image_exists(client, alias):
        engine.tag(client, str(client.images.get(BENCH_BASE).id), alias)
    elif client.images.get(alias).id != client.images.get(BENCH_BASE).id:
        print(f"note: {alias} already exists and is not the bench base; MLflow will use it")
    return alias


def forget_earlier_runs() -> None:
    """Remove this benchmark's images from earlier runs, so no build starts from their
    cached layers (the shared base stays)."""
    names = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "bench/*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if names:
        subprocess.run(["docker", "rmi", "-f", *names], capture_output=True, check=False)
    subprocess.run(["docker", "image", "prune", "-f"], capture_output=True, check=False)


def register(directory: Path) -> None:
    """Register one more version of the example model (the first, then a new run)."""
    subprocess.run(
        [
            *(sys.executable, str(ROOT / "examples" / "register_example.py")),
            *("--dir", str(directory), "--new-version"),
        ],
        check=True,
        capture_output=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--skip-mlflow", action="store_true", help="packager's backends only")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
        work = Path(tmp)
        registry = work / "registry"
        register(registry)
        base_env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{registry / 'mlflow.db'}",
        }
        # Cold means cold: no packager cache, no pip or uv download cache.
        cold = {"PIP_NO_CACHE_DIR": "1", "UV_NO_CACHE": "1"}
        docker_env = {**base_env, **cold, "PACKAGER_CACHE_DIR": str(work / "cache-docker")}
        oci_env = {**base_env, **cold, "PACKAGER_CACHE_DIR": str(work / "cache-oci")}
        v1, v2 = f"models:/{MODEL}/1", f"models:/{MODEL}/2"
        inspect_env = {**base_env, "PACKAGER_CACHE_DIR": str(work / "cache-inspect")}
        alias = shared_base(_model_python(inspect_env, v1))
        forget_earlier_runs()
        common = ["--base-image", BENCH_BASE]

        figures["docker_cold"], _ = packager(
            ["build", v1, "--backend", "docker", "-t", "bench/packager-docker:1", *common],
            docker_env,
        )
        figures["docker_size"] = image_size("bench/packager-docker:1")
        figures["oci_cold"], oci_built = packager(
            [
                *("build", v1, "--backend", "oci", "-t", "bench/packager-oci:1", "--load"),
                *(*common, "-o", str(work / "oci")),
            ],
            oci_env,
        )
        figures["oci_size"] = image_size("bench/packager-oci:1")
        figures["oci_warm"], warm = packager(
            ["build", v1, "--backend", "oci", "-o", str(work / "oci"), *common], oci_env
        )
        # What the image would weigh with mlflow-skinny instead of mlflow (not timed: the
        # wheel cache is warm by now), and without bytecode.
        packager(
            [
                *("build", v1, "--backend", "oci", "-t", "bench/packager-skinny:1", "--load"),
                *(*common, "--mlflow-skinny", "-o", str(work / "oci-skinny")),
            ],
            oci_env,
        )
        figures["skinny_size"] = image_size("bench/packager-skinny:1")
        packager(
            [
                *("build", v1, "--backend", "oci", "-t", "bench/packager-nopyc:1", "--load"),
                *(*common, "--no-bytecode", "-o", str(work / "oci-nopyc")),
            ],
            oci_env,
        )
        figures["nopyc_size"] = image_size("bench/packager-nopyc:1")
        packager(
            [
                *("build", v1, "--backend", "oci", "-t", "bench/packager-tests:1", "--load"),
                *(*common, "--keep-tests", "-o", str(work / "oci-tests")),
            ],
            oci_env,
        )
        figures["keep_tests_size"] = image_size("bench/packager-tests:1")
        register(registry)  # version 2: same requirements, new run
        figures["docker_new_version"], _ = packager(
            ["build", v2, "--backend", "docker", "-t", "bench/packager-docker:2", *common],
            docker_env,
        )
        figures["oci_new_version"], oci_v2 = packager(
            ["build", v2, "--backend", "oci", "-o", str(work / "oci"), *common], oci_env
        )
        # The same new version into the engine: only the layers it lacks are sent.
        figures["oci_new_version_load"], oci_v2_loaded = packager(
            ["build", v2, "--backend", "oci", "-t", "bench/packager-oci:2", "--load", *common],
            oci_env,
        )
        figures["oci_new_version_layers_loaded"] = oci_v2_loaded["layers_loaded"]
        figures["step_on_base"] = step_seconds(BENCH_BASE)
        figures["step_on_image"] = step_seconds("bench/packager-docker:1")

        if not args.skip_mlflow:
            mlflow_env = {**base_env, "PIP_NO_CACHE_DIR": "1"}
            figures["mlflow_cold"], _ = timed(
                [*MLFLOW_BUILD, "-m", v1, "-n", "bench/mlflow:1"],
                mlflow_env,
                cwd=work,
            )
            figures["mlflow_size"] = image_size("bench/mlflow:1")
            figures["mlflow_new_version"], _ = timed(
                [*MLFLOW_BUILD, "-m", v2, "-n", "bench/mlflow:2"],
                mlflow_env,
                cwd=work,
            )
            print(f"base image for both: {BENCH_BASE}, also tagged {alias} for MLflow")
        images = {"packager": "bench/packager-docker:1", "nopyc": "bench/packager-nopyc:1"}
        if not args.skip_mlflow:
            images["mlflow"] = "bench/mlflow:1"
        for name, (first, later) in measure_starts(images).items():
            figures[f"{name}_first_start"], figures[f"{name}_start"] = first, later

    report(figures, warm, oci_v2, oci_built["manifest_digest"], mlflow=not args.skip_mlflow)


def report(
    figures: dict[str, float],
    warm: dict[str, Any],
    new_version: dict[str, Any],
    digest: str,
    *,
    mlflow: bool,
) -> None:
    mib = 2**20
    f = figures
    lines = [
        (
            f"packager docker backend: cold {f['docker_cold']:.1f} s, new version "
            f"{f['docker_new_version']:.1f} s, {f['docker_size'] / mib:.0f} MiB"
        ),
        (
            f"packager oci backend: cold {f['oci_cold']:.1f} s (with --load), warm "
            f"{f['oci_warm']:.2f} s ({warm['layers_written']} layers written), new version "
            f"{f['oci_new_version']:.2f} s ({new_version['layers_written']} of "
            f"{new_version['layers']} layers written), {f['oci_size'] / mib:.0f} MiB"
        ),
        (
            f"packager oci backend, new version with --load: {f['oci_new_version_load']:.2f} s "
            f"({f['oci_new_version_layers_loaded']:.0f} layers sent to the engine)"
        ),
        f"oci image digest: {digest}",
        (
            f"packager image, docker run to /ping: {f['packager_start']:.1f} s "
            f"(first start after the build: {f['packager_first_start']:.1f} s)"
        ),
        (
            f"engine: one Dockerfile step costs {f['step_on_base']:.1f} s on the base, "
            f"{f['step_on_image']:.1f} s on packager's image"
        ),
        (
            f"variants: --mlflow-skinny {f['skinny_size'] / mib:.0f} MiB; --no-bytecode "
            f"{f['nopyc_size'] / mib:.0f} MiB, docker run to /ping {f['nopyc_start']:.1f} s "
            f"(first: {f['nopyc_first_start']:.1f} s); "
            f"--keep-tests {f['keep_tests_size'] / mib:.0f} MiB"
        ),
    ]
    if mlflow:
        lines += [
            (
                f"mlflow build-docker: cold {f['mlflow_cold']:.1f} s, new version "
                f"{f['mlflow_new_version']:.1f} s, {f['mlflow_size'] / mib:.0f} MiB, "
                f"docker run to /ping {f['mlflow_start']:.1f} s "
                f"(first: {f['mlflow_first_start']:.1f} s)"
            ),
            "ratios, mlflow / packager docker backend (higher is better for packager):",
            f"  cold build   {f['mlflow_cold'] / f['docker_cold']:.1f}x",
            (
                f"  new version  {f['mlflow_new_version'] / f['docker_new_version']:.1f}x "
                f"(oci backend: {f['mlflow_new_version'] / f['oci_new_version']:.1f}x)"
            ),
            (
                f"  image size   {f['mlflow_size'] / f['docker_size']:.2f}x "
                f"(--mlflow-skinny: {f['mlflow_size'] / f['skinny_size']:.2f}x)"
            ),
            f"  start        {f['mlflow_start'] / f['packager_start']:.1f}x",
        ]
    print("\n".join(lines))


def _model_python(env: dict[str, str], model: str) -> str:
    _, out = timed([str(BIN / "packager"), "inspect", model, "--json"], env)
    return str(json.loads(out)["spec"]["python_version"])


if __name__ == "__main__":
    main()
