"""``packager webhook`` end to end: a real ``mlflow server`` (webhooks on, loopback over
http allowed by MLflow's own settings), the receiver as its own process, Debian's
docker-registry. Only MLflow calls start releases: registering a version and moving an
alias ends with the image in the registry and its digest recorded on the version.

One model image is built for the first version (the OCI backend, no test run: the
release's test is covered by ``test_release.py``); the second alias on the same version
is "already released". Along the way the receiver is SIGKILLed while that build runs,
with a second event accepted behind it, and restarted: each accepted event completes
once. Then, with the receiver down, a second version is moved to @champion: MLflow's
delivery fails and is never sent again, and reconciliation at the next start releases it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from packager import publish, record
from packager.cli import main
from packager.webhook.queue import Job, JobQueue
from tests.conftest import ROOT, MlflowServer, free_port, wait_for_http
from tests.unit.test_webhook_receiver import WRONG, event, post

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

MODEL = "webhook-e2e"
RELEASE_DEADLINE = 900.0


@dataclass
class Receiver:
    """``python -m packager webhook serve`` in its own session (so SIGKILL takes its
    children too, as a crash of the machine's builder would)."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def workdir(tmp_path: Path, base_image: str, local_registry: str) -> Path:
    (tmp_path / "rules.yaml").write_text(
        "rules:\n"
        f'  - models: "{MODEL}"\n'
        "    aliases: [champion, challenger]\n"
        f'    image: "{local_registry}/webhook/{{name}}:{{version}}"\n'
        "    release: {test: false, attestations: false}\n"
    )
    return tmp_path


@pytest.fixture
def started(workdir: Path, base_image: str) -> Iterator[Callable[[int], Receiver]]:
    receivers: list[Receiver] = []

    def start(port: int) -> Receiver:
        log = workdir / f"receiver-{len(receivers)}.log"
        argv = [sys.executable, "-m", "packager", "webhook", "serve", "--debug"]
        argv += ["--rules", str(workdir / "rules.yaml"), "--secret-env", "HOOK_SECRET"]
        argv += ["--port", str(port), "--queue", str(workdir / "queue.db")]
        argv += ["--base-image", base_image, "--reconcile-interval", "0"]
        argv += ["--retry-backoff", "1"]  # an interrupted attempt waits its backoff
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        receiver = Receiver(port, process, log)
        receivers.append(receiver)
        wait_for_http(f"{receiver.url}/readyz", 60, process, log)
        return receiver

    yield start
    for receiver in receivers:
        receiver.stop()


def jobs(workdir: Path) -> list[Job]:
    queue = JobQueue(workdir / "queue.db", owner=False)
    try:
        return list(queue.jobs())
    finally:
        queue.close()


def wait_until(
    what: str, condition: Callable[[], bool], receiver: Receiver, deadline: float
) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        if receiver.process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached; receiver log:\n{receiver.log.read_text()[-4000:]}")


@pytest.mark.usefixtures("registered_models")
def test_registry_events_release_once_through_a_crash_and_reconcile_what_was_missed(  # noqa: PLR0917 — fixtures
    registry_env: MlflowServer,
    base_image: str,
    workdir: Path,
    started: Callable[[int], Receiver],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    secret = uuid.uuid4().hex
    monkeypatch.setenv("HOOK_SECRET", secret)
    client = MlflowClient(tracking_uri=registry_env.uri)
    port = free_port()
    receiver = started(port)
    url = f"{receiver.url}/webhook/mlflow"
    assert main(["webhook", "register", "--url", url, "--secret-env", "HOOK_SECRET", "--json"]) == 0
    webhook_id = json.loads(capsys.readouterr().out)["webhook_id"]
    try:
        # MLflow's own test event reaches the receiver, signed: acknowledged, ignored.
        assert main(["webhook", "test", webhook_id]) == 0
        assert capsys.readouterr().out.startswith("ok: HTTP 200")

        # Over HTTP: a forged signature and a stale timestamp are refused; a replay is
        # acknowledged and queues nothing.
        body = event("model_version", "created", name="not-covered", version="1")
        assert post(receiver.url, body, secret=WRONG)[0] == 401
        assert post(receiver.url, body, secret=secret, ts=int(time.time()) - 3600)[0] == 401
        delivery = str(uuid.uuid4())
        assert post(receiver.url, body, secret=secret, delivery_id=delivery)[1]["status"] == (
            "ignored"
        )
        assert post(receiver.url, body, secret=secret, delivery_id=delivery)[1]["status"] == (
            "duplicate"
        )

        # A new version, then @champion: the alias move queues the release.
        first = _new_version(client)
        client.set_registered_model_alias(MODEL, "champion", first)
        wait_until("the release runs", lambda: _states(workdir) == ["running"], receiver, 120)
        # A second event for the same version, accepted behind the running build.
        client.set_registered_model_alias(MODEL, "challenger", first)
        wait_until("the second event is queued", lambda: len(jobs(workdir)) == 2, receiver, 60)
        receiver.kill()
        assert _states(workdir) == ["running", "pending"]

        # Restarted: the interrupted attempt counts as failed (its backoff, so the job
        # behind it may run first); one of the two releases, the other finds it released.
        receiver = started(port)
        wait_until(
            "both jobs complete",
            lambda: _states(workdir) == ["done", "done"],
            receiver,
            RELEASE_DEADLINE,
        )
        interrupted, behind = jobs(workdir)
        assert interrupted.attempts == 2
        results = sorted(str(job.result) for job in (interrupted, behind))
        assert results[1].startswith("released: ")
        image = results[1].removeprefix("released: ")
        assert results[0] == f"already released: {image}"
        assert publish.manifest_exists(image)
        tags = client.get_model_version(MODEL, first).tags
        assert tags[record.IMAGE_TAG] == image

        # Down while @champion moves to a new version: MLflow's delivery fails and is not
        # sent again. The next receiver listens elsewhere, so only reconciliation can
        # find the version.
        receiver.stop()
        second = _new_version(client)
        client.set_registered_model_alias(MODEL, "champion", second)
        receiver = started(free_port())
        wait_until(
            "reconciliation releases the new @champion",
            lambda: len(jobs(workdir)) == 3 and _states(workdir)[2] == "done",
            receiver,
            RELEASE_DEADLINE,
        )
        reconciled = jobs(workdir)[2]
        assert reconciled.spec.event == "reconcile"
        assert reconciled.spec.model == f"models:/{MODEL}/{second}"
        assert reconciled.result is not None
        assert reconciled.result.startswith("released: ")
        recorded = client.get_model_version(MODEL, second).tags[record.IMAGE_TAG]
        assert recorded == reconciled.result.removeprefix("released: ")
        assert publish.manifest_exists(recorded)
        _recipe_check_finds_a_changed_lock(client, workdir, base_image, second)
        assert main(["webhook", "jobs", "--queue", str(workdir / "queue.db")]) == 0
        print(capsys.readouterr().out)
        print(f"release seconds: {[j.seconds for j in jobs(workdir)]}")
    finally:
        client.delete_webhook(webhook_id)
        with contextlib.suppress(Exception):
            client.delete_registered_model(MODEL)


def _new_version(client: Any) -> str:
    """A copy of the test model as a new version of MODEL, made through the server (so
    MLflow fires its events); the first copy creates MODEL."""
    return str(client.copy_model_version("models:/pyfunc-code/1", MODEL).version)


def _states(workdir: Path) -> list[str]:
    return [job.state for job in jobs(workdir)]


def _recipe_check_finds_a_changed_lock(
    client: Any, workdir: Path, base_image: str, second: str
) -> None:
    """Reconciliation's recipe comparison, with the receiver's options, against what the
    releases above recorded: nothing to do (a comparison that found every version stale
    would rebuild each one every round); then a recorded lock digest that is not today's
    makes @champion's version stale, and only it."""
    from packager.api import ImageOptions
    from packager.webhook.reconcile import plan
    from packager.webhook.registry import MlflowRegistry
    from packager.webhook.rules import load_rules
    from packager.webhook.worker import recipe_function

    rules = load_rules(workdir / "rules.yaml")
    recipe = recipe_function(image=ImageOptions(base_image=base_image))
    assert plan(rules, MlflowRegistry(), recipe) == ()
    recorded = client.get_model_version(MODEL, second).tags[record.LOCK_DIGEST_TAG]
    client.set_model_version_tag(MODEL, second, record.LOCK_DIGEST_TAG, "sha256:" + "0" * 64)
    try:
        [found] = plan(rules, MlflowRegistry(), recipe)
    finally:
        client.set_model_version_tag(MODEL, second, record.LOCK_DIGEST_TAG, recorded)
    assert found.job.model == f"models:/{MODEL}/{second}"
    assert found.reason == (
        f"was built from another recipe (packager.lock_digest sha256:{'0' * 64} -> {recorded})"
    )
