"""Stage 7, ``verify``: run an image and check that it serves its model correctly.

The image is checked first (in the engine, built by packager). The container runs on a
random loopback port; readiness is awaited with a deadline; the probes (/ping, /health,
/version, /metrics, /live) must answer 200; the server must name the model and version the
labels promise; each payload's answer must equal MLflow's own answer for the model, which
a second container of the same image computes (``packager_server.expected``); start-up
time and memory are measured; the containers are always removed.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import ForeignImageError, ImageTestError
from packager.image import engine
from packager.stage import MODEL_DIR

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
    startup_seconds: float  # `docker run` to /ready answering 200
    latency_p50_ms: float
    # The most memory the container used (as `docker stats`), sampled when ready and after
    # the replays; what a Deployment's memory request and limit are sized from.
    memory_bytes: int | None
    endpoints: tuple[tuple[str, int], ...]
    payloads: tuple[PayloadResult, ...]
    # The model name and version the image's labels promise, and whether the server
    # reports the same in its metrics (None: the image has no such labels).
    labelled_as: str | None = None
    serves_as_labelled: bool = True
    model_digest: str | None = None  # the content digest the image's label records
    # With --model: whether that model's content is what the image was built from.
    built_from_model: bool | None = None

    @property
    def passed(self) -> bool:
        return (
            all(p.matches for p in self.payloads)
            and all(status == 200 for _, status in self.endpoints)
            and self.serves_as_labelled
            and self.built_from_model is not False
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


# Where the expected-answer container finds the request bodies.
_REQUESTS = "/tmp/packager-test"  # noqa: S108 - inside a throwaway container
_EXAMPLE = f"{MODEL_DIR}/serving_input_example.json"
PROBES = ("/ping", "/health", "/version", "/metrics", "/live")


def expected_answers(
    client: Any, image: str, bodies: list[bytes], content_type: str
) -> list[tuple[int, Any]]:
    """MLflow's own answers (its scoring path, no fast path) for ``bodies``, computed in a
    second container of the image under test, with no network: the host needs nothing
    but packager and an engine, and the answers come from the image's own environment."""
    files = {f"{_REQUESTS}/{i}.json": body for i, body in enumerate(bodies)}
    argv = [
        "python",
        "-m",
        "packager_server.expected",
        MODEL_DIR,
        content_type,
        *sorted(files, key=lambda p: int(Path(p).stem)),
    ]
    status, stdout, stderr = engine.run_once(client, image, argv, files=files, timeout=600)
    if status != 0:
        raise ImageTestError(
            f"the image could not compute MLflow's answers for its own model:\n{stderr[-1500:]}",
            hint="the model does not load in its image; `docker run IMAGE` shows the same error",
        )
    answers = json.loads(stdout)
    return [(int(a["status"]), a["body"]) for a in answers]


def verify_image(
    image: str,
    *,
    payloads: tuple[Path, ...] = (),
    model_digest: str | None = None,
    client: Any | None = None,
) -> TestReport:
    """Check ``image`` serves its own model as MLflow does. ``model_digest``: the content
    digest of the model the user says it was built from (``--model``), checked against
    the image's label."""
    client = client or engine.connect()
    labels = engine.image_labels(client, image)  # before anything else: a clear error
    if "io.packager.model.name" not in labels:
        raise ForeignImageError(
            f"{image} was not built by packager: it has no io.packager.* labels",
            hint="packager test checks images that packager build made",
        )
    bodies: list[tuple[str, bytes]] = [(p.name, p.read_bytes()) for p in payloads]
    example = engine.read_image_file(client, image, _EXAMPLE)
    if example is not None:
        bodies.insert(0, (Path(_EXAMPLE).name, example))
    if not bodies:
        raise ImageTestError(
            "nothing to replay: the model has no serving input example", hint="pass --payload FILE"
        )
    expected = expected_answers(client, image, [b for _, b in bodies], "application/json")
    identity = _identity(labels)
    container = client.containers.run(image, detach=True, ports={"8080/tcp": ("127.0.0.1", None)})
    try:
        started = time.monotonic()
        container.reload()
        port = int(container.ports["8080/tcp"][0]["HostPort"])
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, container)
        startup = time.monotonic() - started
        memory = [engine.memory_bytes(container)]
        endpoints = tuple((path, _get(base + path)[0]) for path in PROBES)
        serves_as_labelled = identity is None or identity in _get(base + "/metrics")[1].decode(
            errors="replace"
        )
        results = []
        for (name, body), (want_status, want_body) in zip(bodies, expected, strict=True):
            status, answer = _post(base + "/invocations", body)
            results.append(
                PayloadResult(
                    name=name,
                    status=status,
                    expected_status=want_status,
                    matches=status == want_status and answer == want_body,
                )
            )
        timings = []
        for _ in range(20):
            t0 = time.perf_counter()
            _post(base + "/invocations", bodies[0][1])
            timings.append(time.perf_counter() - t0)
        memory.append(engine.memory_bytes(container))
        measured = [m for m in memory if m is not None]
        return TestReport(
            image=image,
            startup_seconds=startup,
            latency_p50_ms=1000 * statistics.median(timings),
            memory_bytes=max(measured) if measured else None,
            endpoints=endpoints,
            payloads=tuple(results),
            labelled_as=identity,
            serves_as_labelled=serves_as_labelled,
            model_digest=labels.get("io.packager.model.digest"),
            built_from_model=None
            if model_digest is None
            else (labels.get("io.packager.model.digest") == model_digest),
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
