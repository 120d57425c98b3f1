"""``--dispatch k8s-jobs``: one valid Kubernetes Job per release, written atomically."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from packager.cli import _build_parser, _dispatch_release_args
from packager.errors import UsageError
from packager.webhook import dispatch
from packager.webhook.queue import JobQueue
from packager.webhook.rules import ALIAS_CREATED, JobSpec, ReleaseChoices
from packager.webhook.worker import WorkerPool
from tests.unit.test_manifests import KUBERNETES_VERSIONS

SPEC = JobSpec(
    model="models:/Fraud_Detector.v2/12",
    name="Fraud_Detector.v2",
    version="12",
    image="registry.example.com/serving/fraud_detector.v2:12",
    event=ALIAS_CREATED,
    rule_line=2,
    release=ReleaseChoices(test=False, attestations=False, alias="live"),
)
TEMPLATE = dispatch.JobTemplate(
    packager_image="registry.example.com/tools/packager:0.1.0",
    tracking_uri="https://mlflow.example.com",
    namespace="ml-builds",
    env_from_secret="packager-release-credentials",  # noqa: S106 - a Secret's name
    release_args=("--base-image", "registry.example.com/base/python:3.11"),
)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_job_manifest_validates(version: str) -> None:
    document = yaml.safe_load(dispatch.render(dispatch.job_manifest(SPEC, TEMPLATE)))
    kubernetes_validate.validate(document, version, strict=True)
    assert document["kind"] == "Job"
    broken = yaml.safe_load(dispatch.render(dispatch.job_manifest(SPEC, TEMPLATE)))
    broken["spec"]["template"]["spec"]["restartPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_job_runs_the_release_the_rule_chose_without_credentials() -> None:
    job = dispatch.job_manifest(SPEC, TEMPLATE)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["packager"]
    assert container["args"] == [
        "release",
        "models:/Fraud_Detector.v2/12",
        "-t",
        "registry.example.com/serving/fraud_detector.v2:12",
        "--backend",
        "oci",
        "--no-test",
        "--no-attestations",
        "--alias",
        "live",
        "--base-image",
        "registry.example.com/base/python:3.11",
    ]
    assert container["envFrom"] == [{"secretRef": {"name": "packager-release-credentials"}}]
    assert job["metadata"]["namespace"] == "ml-builds"


def test_job_name_is_a_dns_label_fixed_by_model_and_image() -> None:
    name = dispatch.job_name(SPEC)
    assert name.startswith("packager-release-fraud-detector-v2-12-")
    assert len(name) <= 63
    assert dispatch.job_name(replace(SPEC, event="reconcile")) == name
    assert dispatch.job_name(replace(SPEC, image=SPEC.image + "-b")) != name
    long = replace(SPEC, name="x" * 300, model=f"models:/{'x' * 300}/12")
    assert len(dispatch.job_name(long)) == 63


def test_dispatch_to_a_directory_writes_one_file_per_release(tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    dispatcher = dispatch.KubernetesJobs(dispatch.parse_target(f"k8s-jobs:{out}"), TEMPLATE)
    first = dispatcher(SPEC)
    again = dispatcher(SPEC)  # a retry: the same file, the same Job name
    assert first == again
    (written,) = out.iterdir()
    assert written.name == f"{dispatch.job_name(SPEC)}.yaml"
    assert yaml.safe_load(written.read_text()) == dispatch.job_manifest(SPEC, TEMPLATE)


def test_dispatch_to_a_stream_writes_yaml_documents() -> None:
    stream = io.StringIO()
    dispatcher = dispatch.KubernetesJobs(dispatch.parse_target("k8s-jobs:-"), TEMPLATE, stream)
    dispatcher(SPEC)
    dispatcher(replace(SPEC, version="13", model="models:/Fraud_Detector.v2/13"))
    documents = list(yaml.safe_load_all(stream.getvalue()))
    assert [d["metadata"]["annotations"]["packager.io/model"] for d in documents] == [
        "models:/Fraud_Detector.v2/12",
        "models:/Fraud_Detector.v2/13",
    ]


@pytest.mark.parametrize("value", ["k8s-jobs", "k8s-jobs:", "github:owner/repo", "jobs:/tmp"])
def test_unknown_dispatch_is_refused(value: str) -> None:
    with pytest.raises(UsageError) as caught:
        dispatch.parse_target(value)
    assert "k8s-jobs:DIR" in (caught.value.hint or "")


def test_a_uri_with_credentials_is_refused_not_redacted_into_the_job() -> None:
    with pytest.raises(UsageError) as caught:
        replace(TEMPLATE, tracking_uri="https://user:s3cret@mlflow.example.com")
    with pytest.raises(UsageError) as caught_registry:
        replace(TEMPLATE, registry_uri="https://mlflow.example.com/?token=s3cret")
    for error in (caught.value, caught_registry.value):
        assert "s3cret" not in error.message
        assert "--dispatch-secret" in (error.hint or "")


def test_the_registry_uri_goes_to_the_job() -> None:
    template = replace(TEMPLATE, registry_uri="https://registry.example.com")
    (container,) = dispatch.job_manifest(SPEC, template)["spec"]["template"]["spec"]["containers"]
    assert {"name": "MLFLOW_REGISTRY_URI", "value": "https://registry.example.com"} in (
        container["env"]
    )


def test_each_attempt_of_a_queued_job_is_its_own_job(tmp_path: Path) -> None:
    stream = io.StringIO()
    dispatcher = dispatch.KubernetesJobs(dispatch.parse_target("k8s-jobs:-"), TEMPLATE, stream)
    queue = JobQueue(tmp_path / "queue.db")
    spec = replace(SPEC, release=ReleaseChoices())
    try:
        pool = WorkerPool(queue, dispatcher)
        queue.accept("d-1", ALIAS_CREATED, (spec,))
        job = queue.claim()
        assert job is not None
        pool.run_one(job)  # job 1, attempt 1
        queue.accept("d-2", ALIAS_CREATED, (spec,))  # the same release, asked for again
        job = queue.claim()
        assert job is not None
        queue.fail(job, "an attempt that failed before dispatching", seconds=0)
        job = queue.claim(now=1e12)
        assert job is not None
        pool.run_one(job)  # job 2, attempt 2
    finally:
        queue.close()
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(stream.getvalue())]
    assert [n.rsplit("-", 2)[1:] for n in names] == [["1", "1"], ["2", "2"]]
    assert all(len(n) <= 63 for n in names)
    long = replace(SPEC, name="x" * 300, model=f"models:/{'x' * 300}/12")
    assert len(dispatch.job_name(long, job_id=123456, attempt=5)) == 63


def test_serve_flags_a_job_cannot_use_are_refused_the_rest_forwarded(tmp_path: Path) -> None:
    base = [
        "webhook",
        "serve",
        "--rules",
        "r.yaml",
        "--secret-env",
        "S",
        "--dispatch",
        "k8s-jobs:-",
    ]
    args = _build_parser().parse_args(
        [*base, "--system-package", "libgomp1", "--no-bytecode", "--python", "3.11"]
    )
    forwarded = _dispatch_release_args(args)
    assert forwarded == (
        "--system-package",
        "libgomp1",
        "--no-bytecode",
        "--resolver",
        "uv",
        "--platform",
        "linux/amd64",
        "--python",
        "3.11",
    )
    lock = tmp_path / "lock.txt"
    args = _build_parser().parse_args(
        [*base, "--lock", str(lock), "--index-url", "https://u:p@pypi.example/simple"]
    )
    with pytest.raises(UsageError) as caught:
        _dispatch_release_args(args)
    assert "--lock, --index-url" in caught.value.message
    assert "u:p" not in caught.value.message
