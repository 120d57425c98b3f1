"""The receiver over real loopback HTTP, with a fake release function in its worker."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from packager.errors import UsageError
from packager.webhook.queue import JobQueue, RetryPolicy
from packager.webhook.receiver import PATH, Receiver, Server
from packager.webhook.rules import JobSpec, parse_rules
from packager.webhook.signature import sign
from packager.webhook.worker import WorkerPool

SECRET = "receiver-test-secret"
WRONG = "not-the-secret"
RULES = """\
rules:
  - models: "fraud-*"
    aliases: [champion]
    image: "reg.example:5000/serving/{name}:{version}"
  - models: "churn"
    image: "reg.example:5000/serving/{name}:{version}"
"""


class FakeRelease:
    """Records each job it is given; raises what ``failures`` names for a model."""

    def __init__(self) -> None:
        self.calls: list[JobSpec] = []
        self.failures: dict[str, Exception] = {}
        self.lock = threading.Lock()

    def __call__(self, spec: JobSpec) -> str:
        with self.lock:
            self.calls.append(spec)
        if spec.name in self.failures:
            raise self.failures[spec.name]
        return f"released: {spec.image}@sha256:{'0' * 64}"


@dataclass
class Running:
    url: str
    release: FakeRelease
    queue: JobQueue
    receiver: Receiver


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    queue = JobQueue(tmp_path / "queue.db", retry=RetryPolicy(limit=2, base=60))
    release = FakeRelease()
    pool = WorkerPool(queue, release, size=1, poll=0.05)
    receiver = Receiver(
        secret=SECRET, rules=parse_rules(RULES), queue=queue, pool=pool, max_body=4096
    )
    server = Server(receiver, host="127.0.0.1", port=0)
    server.start()
    try:
        yield Running(f"http://127.0.0.1:{server.port}", release, queue, receiver)
    finally:
        server.stop()
        queue.close()


def event(entity: str, action: str, **data: str) -> bytes:
    body = {
        "entity": entity,
        "action": action,
        "timestamp": "2026-12-02T00:00:00+00:00",
        "data": data,
    }
    return json.dumps(body).encode()


def post(
    url: str,
    body: bytes,
    *,
    delivery_id: str | None = None,
    ts: int | None = None,
    secret: str = SECRET,
) -> tuple[int, dict[str, object]]:
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if ts is None else ts)
    request = urllib.request.Request(
        url + PATH,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign(secret, delivery_id, stamp, body),
        },
    )
    return _open(request)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _open(request: urllib.request.Request) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met before the deadline")


def test_signed_event_is_queued_released_once_and_replay_is_acknowledged(
    running: Running,
) -> None:
    body = event("model_version_alias", "created", name="fraud-eu", alias="champion", version="4")
    status, answer = post(running.url, body, delivery_id="d-1")
    assert (status, answer) == (200, {"status": "queued", "jobs": [1]})
    wait_for(lambda: running.queue.get(1).state == "done")
    assert [c.image for c in running.release.calls] == ["reg.example:5000/serving/fraud-eu:4"]
    # MLflow's retry (or a replay) carries the same id: 2xx, nothing new queued or run.
    assert post(running.url, body, delivery_id="d-1") == (200, {"status": "duplicate", "jobs": []})
    # One worker runs jobs in order: once a later event is released, a job the replay
    # had wrongly queued would have run before it.
    post(running.url, event("model_version", "created", name="churn", version="9"))
    wait_for(lambda: running.queue.get(2).state == "done")
    assert [c.model for c in running.release.calls] == ["models:/fraud-eu/4", "models:/churn/9"]
    metrics = get(running.url + "/metrics")[1]
    assert 'packager_webhook_jobs{state="done"} 2' in metrics
    assert "packager_webhook_queue_depth 0" in metrics
    assert "packager_webhook_release_seconds_count 2" in metrics


def test_event_no_rule_matches_is_acknowledged_as_ignored(running: Running) -> None:
    for body in (
        event("model_version", "created", name="fraud-eu", version="5"),  # alias rule only
        event("model_version_alias", "created", name="fraud-eu", alias="canary", version="5"),
        event("registered_model", "created", name="churn"),
    ):
        assert post(running.url, body) == (200, {"status": "ignored", "jobs": []})
    assert running.queue.jobs() == ()


def test_forged_and_stale_deliveries_get_401_and_no_body_in_the_log(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="packager.webhook")
    body = event("model_version", "created", name="churn", version="1", description="BODYMARK")
    assert post(running.url, body, secret=WRONG)[0] == 401
    assert post(running.url, body, ts=int(time.time()) - 301)[0] == 401
    assert post(running.url, body, ts=int(time.time()) + 301)[0] == 401
    assert running.queue.jobs() == ()
    assert "refused delivery" in caplog.text
    assert "BODYMARK" not in caplog.text
    assert SECRET not in caplog.text


def test_bad_bodies_get_clear_errors(running: Running) -> None:
    status, answer = post(running.url, b"{not json")
    assert status == 400
    assert "not an MLflow event" in str(answer["error"])
    status, answer = post(running.url, event("model_version", "created", name="churn"))
    assert (status, "data.version" in str(answer["error"])) == (400, True)
    big = event("model_version", "created", name="churn", version="1", description="x" * 5000)
    assert post(running.url, big)[0] == 413
    assert running.queue.jobs() == ()


def test_health_and_routes(running: Running) -> None:
    assert get(running.url + "/livez") == (200, '{"live": true}')
    assert get(running.url + "/readyz") == (200, '{"ready": true}')
    assert get(running.url + "/nope")[0] == 404
    assert get(running.url + PATH)[0] == 405


def test_release_failures_retry_or_park(running: Running) -> None:
    running.release.failures["churn"] = RuntimeError("registry went away")
    post(running.url, event("model_version", "created", name="churn", version="1"))
    wait_for(lambda: running.queue.get(1).state == "failed")
    assert running.queue.get(1).error == "RuntimeError('registry went away')"
    running.release.failures["churn"] = UsageError("bad image reference")
    post(running.url, event("model_version", "created", name="churn", version="2"))
    wait_for(lambda: running.queue.get(2).state == "parked")
    assert running.queue.get(2).attempts == 1  # permanent: not retried
    metrics = get(running.url + "/metrics")[1]
    assert 'packager_webhook_attempts_total{outcome="parked"} 1' in metrics
    assert "packager_webhook_queue_depth 1" in metrics  # the failed one waits its backoff


CHILD = """
import sys, time
from pathlib import Path
from packager.webhook.queue import JobQueue
from packager.webhook.receiver import Receiver, Server
from packager.webhook.rules import parse_rules
from packager.webhook.worker import WorkerPool

def release(spec):
    print("RUNNING " + spec.version, flush=True)
    time.sleep(600)  # still building when it is killed
    return "never"

queue = JobQueue(Path(sys.argv[1]))
pool = WorkerPool(queue, release, size=1, poll=0.05)
receiver = Receiver(secret=sys.argv[2], rules=parse_rules(sys.argv[3]), queue=queue, pool=pool)
server = Server(receiver, host="127.0.0.1", port=0)
server.start()
print(server.port, flush=True)
time.sleep(600)
"""


def test_receiver_killed_mid_release_resumes_every_accepted_event_once(tmp_path: Path) -> None:
    """SIGKILL while one job runs and two more wait: a new receiver on the same queue
    releases all three, each once to completion."""
    db = tmp_path / "queue.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), SECRET, RULES],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = f"http://127.0.0.1:{int(child.stdout.readline())}"
        for version in ("1", "2", "3"):
            body = event("model_version", "created", name="churn", version=version)
            assert post(url, body)[1]["status"] == "queued"
            if version == "1":
                assert child.stdout.readline().strip() == "RUNNING 1"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    queue = JobQueue(db, retry=RetryPolicy(base=0))  # the interrupted attempt: no wait
    assert [j.state for j in queue.jobs()] == ["running", "pending", "pending"]
    release = FakeRelease()
    pool = WorkerPool(queue, release, size=2, poll=0.05)
    server = Server(Receiver(secret=SECRET, rules=parse_rules(RULES), queue=queue, pool=pool))
    server.start()
    try:
        wait_for(lambda: queue.counts()["done"] == 3)
        assert sorted(c.version for c in release.calls) == ["1", "2", "3"]
        assert [j.attempts for j in queue.jobs()] == [2, 1, 1]
    finally:
        server.stop()
        queue.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def test_idle_tls_connection_does_not_stop_other_requests_or_the_shutdown(
    tmp_path: Path,
) -> None:
    certfile, keyfile = _self_signed(tmp_path)
    queue = JobQueue(tmp_path / "queue.db")
    pool = WorkerPool(queue, FakeRelease(), size=1, poll=0.05)
    receiver = Receiver(secret=SECRET, rules=parse_rules(RULES), queue=queue, pool=pool)
    server = Server(receiver, host="127.0.0.1", port=0, certfile=certfile, keyfile=keyfile)
    server.start()
    idle = socket.create_connection(("127.0.0.1", server.port))  # connects, never speaks
    try:
        context = ssl.create_default_context(cafile=str(certfile))
        url = f"https://127.0.0.1:{server.port}/livez"
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            assert (response.status, response.read()) == (200, b'{"live": true}')
    finally:
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(10)
        stopped = not stopper.is_alive()
        idle.close()
        stopper.join(10)
        queue.close()
    assert stopped, "stop() hung behind the idle connection"


def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as is; the answer, up to the server closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_odd_lengths_and_unsigned_posts_are_refused_before_the_body(running: Running) -> None:
    port = int(running.url.rsplit(":", 1)[1])
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\n"
    # "²" is a digit to str.isdigit(), not to int().
    assert _raw(port, f"{head}Content-Length: ²\r\n\r\n".encode()).startswith(b"HTTP/1.1 411")
    # Unsigned, its (large) body never sent: refused at once, not after a read timeout.
    assert _raw(port, f"{head}Content-Length: 4000\r\n\r\n".encode()).startswith(b"HTTP/1.1 401")
    stamp = "X-MLflow-Delivery-Id: d-1\r\nX-MLflow-Timestamp: ²\r\nX-MLflow-Signature: v1,AA==\r\n"
    answer = _raw(port, f"{head}{stamp}Content-Length: 4000\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 401")
    assert running.queue.jobs() == ()


def test_connections_over_the_cap_get_503(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "queue.db")
    pool = WorkerPool(queue, FakeRelease(), size=1, poll=0.05)
    receiver = Receiver(secret=SECRET, rules=parse_rules(RULES), queue=queue, pool=pool)
    server = Server(receiver, host="127.0.0.1", port=0, max_connections=1)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as held:
            held.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(12) == b"HTTP/1.1 200"  # served, and kept open (HTTP/1.1)
            assert get(f"http://127.0.0.1:{server.port}/livez")[0] == 503
        wait_for(lambda: get(f"http://127.0.0.1:{server.port}/livez")[0] == 200)
    finally:
        server.stop()
        queue.close()


def test_readiness_includes_background_threads(running: Running) -> None:
    running.receiver.background.append(lambda: False)
    status, body = get(running.url + "/readyz")
    assert (status, json.loads(body)["reason"]) == (503, "reconciler not running")


def test_a_worker_outlives_a_queue_error_when_recording(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = running.queue.complete
    calls: list[int] = []

    def flaky(job: object, result: str, *, seconds: float) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk I/O error")
        return real(job, result, seconds=seconds)  # type: ignore[arg-type]

    monkeypatch.setattr(running.queue, "complete", flaky)
    post(running.url, event("model_version", "created", name="churn", version="1"))
    wait_for(lambda: len(calls) == 1)
    post(running.url, event("model_version", "created", name="churn", version="2"))
    wait_for(lambda: running.queue.get(2).state == "done")
    assert running.receiver.pool.alive()
