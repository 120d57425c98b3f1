"""``packager webhook``: serve as a process (dispatching), jobs and retry beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from packager.cli import main
from packager.webhook.queue import JobQueue
from packager.webhook.rules import JobSpec, ReleaseChoices
from tests.conftest import free_port, wait_for_http
from tests.unit.test_webhook_receiver import SECRET, event, post, wait_for

ROOT = Path(__file__).resolve().parents[2]
RULES = """\
rules:
  - models: "fraud-*"
    aliases: [champion]
    image: "reg.example:5000/serving/{name}:{version}"
    release: {test: false}
"""


@dataclass
class Serving:
    url: str
    queue: Path
    jobs: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    queue, jobs, log = tmp_path / "queue.db", tmp_path / "jobs", tmp_path / "serve.log"
    argv = [sys.executable, "-m", "packager", "webhook", "serve", "--rules", str(rules)]
    argv += ["--secret-env", "HOOK_SECRET", "--port", str(port), "--queue", str(queue)]
    argv += ["--dispatch", f"k8s-jobs:{jobs}", "--dispatch-image", "reg.example/packager:1"]
    env = {**os.environ, "HOOK_SECRET": SECRET, "MLFLOW_TRACKING_URI": ""}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", 30, process, log)
        yield Serving(f"http://127.0.0.1:{port}", queue, jobs, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def test_serve_dispatches_and_jobs_reads_the_queue_while_it_runs(
    serving: Serving, capsys: pytest.CaptureFixture[str]
) -> None:
    body = event("model_version_alias", "created", name="fraud-x", alias="champion", version="3")
    status, answer = post(serving.url, body)
    assert (status, answer["status"]) == (200, "queued")
    wait_for(lambda: serving.jobs.is_dir() and any(serving.jobs.glob("*.yaml")), 10)
    (manifest,) = serving.jobs.glob("*.yaml")
    job = yaml.safe_load(manifest.read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:4] == [
        "release",
        "models:/fraud-x/3",
        "-t",
        "reg.example:5000/serving/fraud-x:3",
    ]

    def done() -> bool:
        assert main(["webhook", "jobs", "--queue", str(serving.queue), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)["jobs"]
        return [j["state"] for j in listed] == ["done"]

    wait_for(done, 10)  # read by another process while the receiver owns the queue
    assert main(["webhook", "jobs", "--queue", str(serving.queue)]) == 0
    assert "done     models:/fraud-x/3 -> reg.example:5000/serving/fraud-x:3" in (
        capsys.readouterr().out
    )
    assert main(["webhook", "retry", "1", "--queue", str(serving.queue)]) == 2
    assert "not failed or parked" in capsys.readouterr().err

    serving.process.send_signal(signal.SIGTERM)
    assert serving.process.wait(timeout=30) == 0


def test_retry_requeues_a_parked_job_while_the_owner_holds_the_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = JobQueue(tmp_path / "queue.db")  # holds the ownership lock, as serve does
    try:
        spec = JobSpec(
            model="models:/m/1",
            name="m",
            version="1",
            image="reg.example/m:1",
            event="model_version.created",
            rule_line=2,
            release=ReleaseChoices(),
        )
        owner.accept("d-1", spec.event, (spec,))
        job = owner.claim()
        assert job is not None
        owner.fail(job, "the registry refused", seconds=1.0, permanent=True)
        assert main(["webhook", "retry", str(job.id), "--queue", str(owner.path)]) == 0
        assert "queued again" in capsys.readouterr().out
        assert owner.get(job.id).state == "pending"
    finally:
        owner.close()


def test_jobs_on_a_missing_queue_says_which_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["webhook", "jobs", "--queue", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert "no webhook queue" in err
    assert "--queue" in err
    assert not (tmp_path / "none.db").exists()


def test_serve_refuses_bad_options_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    base = ["webhook", "serve", "--rules", str(rules), "--queue", str(tmp_path / "q.db")]
    assert main([*base, "--secret-env", "UNSET_VARIABLE_X"]) == 2
    assert "secret" in capsys.readouterr().err
    assert main([*base, "--secret-env", "HOOK_SECRET", "--dispatch", "k8s-jobs:-"]) == 2
    assert "--dispatch-image" in capsys.readouterr().err
    assert main([*base, "--secret-env", "HOOK_SECRET", "--certfile", "c.pem"]) == 2
    assert "--keyfile" in capsys.readouterr().err
