"""Shared fixtures: a real MLflow tracking server with real logged models.

Tests that need an external component are marked (``mlflow_server``, ``docker``). When the
component is missing they are skipped with the reason on a developer machine, and they
*fail* when ``CI`` is set: CI must never go green by skipping what it was meant to test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVER_START_DEADLINE = 120.0
LOG_MODELS_DEADLINE = 900.0


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail under CI."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str,
    deadline: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``url`` until it answers 200, the process dies, or the deadline passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(
                f"process exited with {process.returncode} before {url} answered:\n{tail}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {deadline:.0f}s")


# MLflow's own settings for registry webhooks to a receiver on loopback over http: the
# defaults refuse both. A fixed Fernet key, so the stored webhook secret stays readable
# (MLflow makes a random key per process without one), and a short cache, so a webhook
# fires a second after it is created instead of a minute.
WEBHOOK_SETTINGS = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "cGFja2FnZXItdGVzdHMtd2ViaG9vay1rZXktMzJieXQ=",
}


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    root: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server``: SQLite backend, proxied artifacts, on 127.0.0.1."""
    try:
        import mlflow.server  # noqa: F401
    except ImportError:
        unavailable("the mlflow server package is not installed (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", **WEBHOOK_SETTINGS}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", SERVER_START_DEADLINE, process, log)
        except (RuntimeError, TimeoutError) as err:
            unavailable(f"mlflow server did not start: {err}")
        yield MlflowServer(uri=f"http://127.0.0.1:{port}", root=root)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # The server forks workers (gunicorn/uvicorn): signal the whole session.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def private_wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels that exist on no public index."""
    from tests.fixtures.wheelmaker import build_wheel

    out = tmp_path_factory.mktemp("private-wheels")
    return {
        "acme-featurizer": build_wheel(
            out,
            "acme_featurizer",
            "0.1.0",
            {
                "acme_featurizer/__init__.py": (
                    "def featurize(x):\n    return float(x) * 10.0 + 1.0\n"
                ),
            },
        ),
        "acme-private-lib": build_wheel(
            out,
            "acme_private_lib",
            "1.0.0",
            {
                "acme_private_lib/__init__.py": "SECRET_SAUCE = 42\n",
            },
        ),
    }


@pytest.fixture(scope="session")
def private_index(private_wheels: dict[str, Path]) -> Iterator[Any]:
    """A PEP 503 index with basic auth on 127.0.0.1, hosting the private wheels."""
    from tests.fixtures.private_index import PrivateIndex

    index = PrivateIndex(wheels=list(private_wheels.values())).start()
    try:
        yield index
    finally:
        index.stop()


@pytest.fixture(scope="session")
def registered_models(mlflow_server: MlflowServer, private_index: Any) -> dict[str, Any]:
    """Log and register every test model once per session; returns the manifest."""
    out = mlflow_server.root / "models.json"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    result = subprocess.run(
        [
            sys.executable,
            str(FIXTURES / "log_models.py"),
            "--tracking-uri",
            mlflow_server.uri,
            "--out",
            str(out),
            "--private-index",
            private_index.url_with_credentials,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=LOG_MODELS_DEADLINE,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"logging the test models failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}",
            pytrace=False,
        )
    manifest: dict[str, Any] = json.loads(out.read_text())
    return manifest["models"]  # type: ignore[no-any-return]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty packager cache for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PACKAGER_CACHE_DIR", str(path))
    return path


@pytest.fixture
def registry_env(
    mlflow_server: MlflowServer,
    registered_models: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    cache_dir: Path,
) -> MlflowServer:
    """MLFLOW_TRACKING_URI pointing at the test server, with the models registered."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return mlflow_server


def pytest_runtest_setup(item: pytest.Item) -> None:
    if (
        item.get_closest_marker("docker") is not None
        and shutil.which("docker") is None
        and not Path("/var/run/docker.sock").exists()
    ):
        unavailable("no Docker engine on this machine (set DOCKER_HOST or start dockerd)")


# -- The flavor tests' environment (issue 18) --------------------------------------------
# TensorFlow, torch and the other frameworks users register live in .venv-flavors (created
# by scripts/lib.sh ensure_flavor_venv, which scripts/check runs), not in the .venv pytest
# runs in: both servers under test and the model fixtures run with its interpreter.
FLAVOR_VENV = ROOT / ".venv-flavors"
FLAVOR_SETUP = "bash -c 'source scripts/lib.sh && ensure_venv && ensure_flavor_venv'"
FLAVOR_MODEL_DEADLINE = 600.0


def flavor_venv_digest() -> str:
    """The digest scripts/lib.sh's ``flavor_venv_digest`` stamps .venv-flavors with."""
    files = ("pyproject.toml", "constraints/flavors.in", "constraints/flavors.txt")
    return hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in files)).hexdigest()


@pytest.fixture(scope="session")
def flavor_python() -> Path:
    """.venv-flavors' interpreter, once it is installed and matches the constraints."""
    python = FLAVOR_VENV / "bin" / "python"
    stamp = FLAVOR_VENV / ".packager-setup"
    if not python.exists():
        unavailable(f"the flavor test environment {FLAVOR_VENV} is missing: run {FLAVOR_SETUP}")
    if not stamp.exists() or stamp.read_text().strip() != flavor_venv_digest():
        unavailable(
            f"the flavor test environment {FLAVOR_VENV} is incomplete or was built from "
            f"another pyproject.toml or constraints/flavors.*: run {FLAVOR_SETUP}"
        )
    return python


class FlavorModels:
    """Logs the models of tests/fixtures/flavor_models.py on first use, once per session,
    through a real ``mlflow server`` (registered there, then downloaded from it)."""

    def __init__(self, python: Path, out: Path, tracking_uri: str) -> None:
        self.python = python
        self.out = out
        self.tracking_uri = tracking_uri

    def __call__(self, name: str) -> Path:
        path = self.out / name
        if (path / "MLmodel").exists():
            return path
        result = subprocess.run(
            [str(self.python), str(FIXTURES / "flavor_models.py"), str(self.out), name],
            capture_output=True,
            text=True,
            timeout=FLAVOR_MODEL_DEADLINE,
            check=False,
            env={
                **os.environ,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1",
                "FLAVOR_MODELS_TRACKING_URI": self.tracking_uri,
            },
        )
        if result.returncode != 0:
            pytest.fail(
                f"logging the {name} model failed:\n{result.stdout[-2000:]}\n"
                f"{result.stderr[-5000:]}",
                pytrace=False,
            )
        return path


@pytest.fixture(scope="session")
def flavor_models(
    flavor_python: Path, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> FlavorModels:
    """``flavor_models(name)``: the directory of one flavor model, as the registry gives it."""
    return FlavorModels(flavor_python, tmp_path_factory.mktemp("flavor-models"), mlflow_server.uri)


# -- py-rattler and the end of the test process -----------------------------------------
# The conda tests solve and install with py-rattler, whose runtime threads may touch Python
# while the interpreter finalizes: the process then aborts after every test passed (see
# packager.cli.exit_before_finalizing). The session's exit status is kept and the process
# ends with it, unfinalized, once pytest has written everything.
_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    from packager.cli import RUST_RUNTIMES, exit_before_finalizing

    if RUST_RUNTIMES & sys.modules.keys() and _EXIT_STATUS:
        exit_before_finalizing(_EXIT_STATUS[-1])
