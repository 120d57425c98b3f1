"""Stage 7, ``verify``: run an image and check that it serves its model correctly.

The container runs on a random loopback port; readiness is awaited with a deadline; the
probes (/ping, /health, /version, /metrics) must answer 200; each payload's answer must
equal MLflow's own answer for the model (``packager_server.expected``, run locally); the
container is always removed.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import ImageTestError
from packager.image import engine

log = logging.getLogger(__name__)

READY_DEADLINE = 180.0


@dataclass(frozen=True, kw_only=True)
class PayloadResult:
    name: str
    status: int
    expected_status: int
    matches: bool


@dataclass(frozen=True, kw_only=True)
class TestReport:
    image: str
    startup_seconds: float
    latency_p50_ms: float
    endpoints: tuple[tuple[str, int], ...]
    payloads: tuple[PayloadResult, ...]
    # The model name and version the image's labels promise, and whether the server
    # reports the same in its metrics (None: the image has no such labels).
    labelled_as: str | None = None
    serves_as_labelled: bool = True

    @property
    def passed(self) -> bool:
        return (
            all(p.matches for p in self.payloads)
            and all(status == 200 for _, status in self.endpoints)
            and self.serves_as_labelled
        )


def _identity(image_labels: dict[str, str]) -> str | None:
    """``model="NAME",version="V"`` as the server's metrics label their series."""
    name = image_labels.get("io.packager.model.name")
    if name is None:
        return None
    version = image_labels.get("io.packager.model.version", "")

    def quoted(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return f'model="{quoted(name)}",version="{quoted(version)}"'


def _expected_env() -> dict[str, str]:
    """A clean environment for loading the model; PYTHONPATH passes through, since it is
    how packages that exist on no index (a private wheel) are made importable here."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def expected_answer(model_dir: Path, payload: Path, content_type: str) -> tuple[int, Any]:
    """MLflow's answer for ``payload``, computed in this Python environment."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "packager_server.expected",
            str(model_dir),
            str(payload),
            content_type,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=_expected_env(),
    )
    if result.returncode != 0:
        raise ImageTestError(
            "cannot compute the model's expected answers in this environment:\n"
            + result.stderr[-1500:],
            hint="run packager test where the model's requirements are installed",
        )
    data = json.loads(result.stdout)
    return int(data["status"]), data["body"]


def verify_image(
    image: str, *, model_dir: Path, payloads: tuple[Path, ...] = (), client: Any | None = None
) -> TestReport:
    client = client or engine.connect()
    requests = list(payloads)
    example = model_dir / "serving_input_example.json"
    if example.is_file():
        requests.insert(0, example)
    if not requests:
        raise ImageTestError(
            "nothing to replay: the model has no serving input example", hint="pass --payload FILE"
        )
    expected = {p: expected_answer(model_dir, p, "application/json") for p in requests}
    identity = _identity(client.images.get(image).labels or {})
    container = client.containers.run(image, detach=True, ports={"8080/tcp": ("127.0.0.1", None)})
    try:
        started = time.monotonic()
        container.reload()
        port = int(container.ports["8080/tcp"][0]["HostPort"])
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, container)
        startup = time.monotonic() - started
        endpoints = tuple(
            (path, _get(base + path)[0])
            for path in ("/ping", "/health", "/version", "/metrics", "/live")
        )
        serves_as_labelled = identity is None or identity in _get(base + "/metrics")[1].decode(
            errors="replace"
        )
        results = []
        for path in requests:
            status, body = _post(base + "/invocations", path.read_bytes())
            want_status, want_body = expected[path]
            results.append(
                PayloadResult(
                    name=path.name,
                    status=status,
                    expected_status=want_status,
                    matches=status == want_status and body == want_body,
                )
            )
        timings = []
        first = requests[0].read_bytes()
        for _ in range(20):
            t0 = time.perf_counter()
            _post(base + "/invocations", first)
            timings.append(time.perf_counter() - t0)
        return TestReport(
            image=image,
            startup_seconds=startup,
            latency_p50_ms=1000 * statistics.median(timings),
            endpoints=endpoints,
            payloads=tuple(results),
            labelled_as=identity,
            serves_as_labelled=serves_as_labelled,
        )
    finally:
        container.remove(force=True)


def _wait_ready(base: str, container: Any) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            logs = container.logs(tail=50).decode(errors="replace")
            raise ImageTestError(f"the container exited before it was ready:\n{logs}")
        try:
            if _get(base + "/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise ImageTestError(f"the container was not ready within {READY_DEADLINE:.0f}s")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def _post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback, http only
        url,
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())
