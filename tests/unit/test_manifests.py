"""``packager manifests``: reading the image from a (fake) registry, sizing, the manifests
themselves validated against the Kubernetes schemas of several minor versions (and the KServe
resource against a schema of KServe's CRD), determinism and atomic writes. The real registry
is in tests/image/test_manifests_registry.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from packager.deploy import inputs, manifests
from packager.deploy.inputs import ImageFacts, Measured
from packager.deploy.manifests import ManifestOptions
from packager.errors import ForeignImageError, ImageNotFoundError, PushError, UsageError
from packager.image.registry import Target
from tests.conftest import FIXTURES, unavailable

# Two current minor versions and the newest kubernetes-validate ships (offline schemas).
KUBERNETES_VERSIONS = ("1.33.0", "1.34.0", "1.37.0")
KSERVE_SCHEMA = FIXTURES / "kserve" / "inferenceservice-v1beta1.schema.json"
DIGEST = "sha256:" + "ab" * 32

LABELS = {
    "io.packager.model.name": "Wine Quality",
    "io.packager.model.version": "3",
    "io.packager.model.run-id": "0a1b2c3d4e5f",
    "io.packager.model.digest": "sha256:" + "cd" * 32,
    "org.opencontainers.image.title": "Wine Quality (MLflow model)",
    "org.opencontainers.image.revision": "0a1b2c3d4e5f",
    "maintainer": "not provenance",
}


IMAGE = ImageFacts(
    reference=f"127.0.0.1:5000/team/wine@{DIGEST}",
    uid=10001,
    gid=10001,
    labels=tuple(sorted((k, v) for k, v in LABELS.items() if k != "maintainer")),
)


def _image(**changes: Any) -> ImageFacts:
    return replace(IMAGE, **changes)


MEASURED = Measured(startup_seconds=20.0, memory_bytes=300 * 2**20, source="flags")


def _plan(**options: Any) -> dict[str, dict[str, Any]]:
    return manifests.plan_manifests(_image(), MEASURED, ManifestOptions(**options)).files


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1
    return dict(containers[0])


# -- the registry side, with a fake registry --------------------------------------------------


class FakeRegistry:
    """Serves one image: a manifest by tag and by digest, and its config blob."""

    def __init__(self, config: dict[str, Any], *, tag: str = "3") -> None:
        self.config = json.dumps(config).encode()
        config_digest = "sha256:" + hashlib.sha256(self.config).hexdigest()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(self.config),
                },
                "layers": [],
            }
        ).encode()
        self.digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        self.tag = tag
        self.blobs = {config_digest: self.config}
        self.targets: list[Target] = []

    def __call__(self, target: Target) -> FakeRegistry:
        self.targets.append(target)
        return self

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        if reference not in (self.tag, self.digest):
            raise PushError(f"refused the manifest of {reference} (HTTP 404)")
        return self.manifest, "application/vnd.oci.image.manifest.v1+json"

    def fetch_blob(self, digest: str, destination: Path) -> None:
        destination.write_bytes(self.blobs[digest])


def _config(user: str = "10001:10001", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"config": {"User": user, "Labels": LABELS if labels is None else labels}}


def test_a_tag_is_pinned_to_the_digest_its_registry_serves() -> None:
    fake = FakeRegistry(_config())
    facts = inputs.read_image("127.0.0.1:5000/team/wine:3", client_factory=fake)
    assert facts.reference == f"127.0.0.1:5000/team/wine@{fake.digest}"
    assert (facts.uid, facts.gid) == (10001, 10001)
    assert fake.targets[0].repository == "team/wine"
    # Provenance labels only, sorted: a stable order for stable YAML.
    assert [k for k, _ in facts.labels] == sorted(k for k in LABELS if k != "maintainer")
    pinned = inputs.read_image(facts.reference, client_factory=fake)
    assert pinned == facts


def test_a_digest_the_registry_does_not_serve_is_refused() -> None:
    fake = FakeRegistry(_config())
    with pytest.raises(ImageNotFoundError, match="cannot read") as caught:
        inputs.read_image(f"127.0.0.1:5000/team/wine@{DIGEST}", client_factory=fake)
    assert "push it first" in str(caught.value.hint)
    with pytest.raises(UsageError, match="not a sha256 digest"):
        inputs.read_image("127.0.0.1:5000/team/wine@sha256:beef", client_factory=fake)
    with pytest.raises(ImageNotFoundError, match="names no registry"):
        inputs.read_image("wine:3", client_factory=fake)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config(labels={"maintainer": "x"}), "not built by packager"),
        (_config(user=""), "root"),
        (_config(user="0:0"), "root"),
        (_config(user="model"), "numeric uid"),
    ],
)
def test_images_that_cannot_run_as_a_hardened_pod_are_refused(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ForeignImageError, match=message):
        inputs.read_image("127.0.0.1:5000/x:3", client_factory=FakeRegistry(config))


def test_a_uid_without_group_sets_no_run_as_group() -> None:
    facts = inputs.read_image(
        "127.0.0.1:5000/x:3", client_factory=FakeRegistry(_config(user="4242"))
    )
    assert (facts.uid, facts.gid) == (4242, None)
    files = manifests.plan_manifests(facts, MEASURED, ManifestOptions()).files
    pod = files["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 4242
    assert "runAsGroup" not in pod["securityContext"]


# -- validation against the schemas ----------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_manifest_validates(version: str) -> None:
    files = _plan(namespace="ml")
    kinds = set()
    for name, obj in files.items():
        document = yaml.safe_load(manifests.render({name: obj})[name])
        assert document == obj  # the YAML says exactly what was planned
        if name == "kustomization.yaml":
            continue
        kubernetes_validate.validate(document, version, strict=True)
        kinds.add(document["kind"])
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_broken_manifest_fails_the_same_validation(version: str) -> None:
    """The validation has teeth: a misspelt field or a wrong type is caught."""
    deployment = _plan()["deployment.yaml"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def _kserve_checks(isvc: dict[str, Any], version: str) -> None:
    schema = json.loads(KSERVE_SCHEMA.read_text())
    jsonschema.validate(isvc, schema)
    # The predictor is a pod spec plus KServe's fields: the pod part must be a valid Pod.
    predictor = isvc["spec"]["predictor"]
    kserve_only = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": isvc["metadata"]["name"]},
        "spec": {k: v for k, v in predictor.items() if k not in kserve_only},
    }
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kserve_inference_service_validates(version: str) -> None:
    files = _plan(format="kserve")
    assert sorted(files) == ["inferenceservice.yaml", "kustomization.yaml"]
    isvc = yaml.safe_load(manifests.render(files)["inferenceservice.yaml"])
    _kserve_checks(isvc, version)
    broken = json.loads(json.dumps(isvc))
    broken["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        _kserve_checks(broken, version)
    broken = json.loads(json.dumps(isvc))
    broken["spec"]["predictor"]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _kserve_checks(broken, version)


# -- what the manifests say -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["kubernetes", "kserve"])
def test_the_pod_is_hardened_probed_and_pinned_by_digest(form: str) -> None:
    files = _plan(format=form)
    pod = (
        files["deployment.yaml"]["spec"]["template"]["spec"]
        if form == "kubernetes"
        else files["inferenceservice.yaml"]["spec"]["predictor"]
    )
    container = _container(pod)
    assert container["image"] == f"127.0.0.1:5000/team/wine@{DIGEST}"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # The only writable place is an emptyDir on /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["name"] == "tmp"
    assert "emptyDir" in pod["volumes"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The server answers /livez while loading: only /readyz says the model is loaded.
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    port = container["ports"][0]
    assert port["containerPort"] == 8080
    assert container["livenessProbe"]["httpGet"]["port"] in (port["name"], 8080)


def test_sizing_follows_the_measurements() -> None:
    plan = manifests.plan_manifests(
        _image(),
        Measured(startup_seconds=20.0, memory_bytes=1000 * 2**20, source="r.json"),
        ManifestOptions(cpu="1500m"),
    )
    files, sizing = plan.files, plan.sizing
    container = _container(files["deployment.yaml"]["spec"]["template"]["spec"])
    startup = container["startupProbe"]
    # 3 x 20 s of start-up, in 5 s periods.
    assert startup["periodSeconds"] * startup["failureThreshold"] == 60
    assert sizing.startup_budget_seconds == 60
    # 1000 MiB x 1.5, rounded up to 16 MiB; requests = limits (no surprise OOM kill).
    assert container["resources"]["limits"] == {"cpu": "1500m", "memory": "1504Mi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    # 1.5 CPUs: two workers, as the server rounds the cgroup quota up.
    assert sizing.workers == 2
    env = {e["name"]: e for e in container["env"]}
    assert env["PACKAGER_WORKERS"]["valueFrom"]["resourceFieldRef"] == {
        "resource": "limits.cpu",
        "divisor": "1",
    }
    # The grace period covers the preStop pause, the server's drain and the 5 s after it
    # which the supervisor kills a worker that has not stopped.
    pod = files["deployment.yaml"]["spec"]["template"]["spec"]
    drain = float(env["PACKAGER_GRACEFUL_TIMEOUT"]["value"])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + drain + 5
    assert sizing.termination_grace_period_seconds == 45
    # A fast start still gets a floor, so a slow node is not killed in a loop.
    quick = manifests.plan_manifests(
        _image(), Measured(startup_seconds=0.5, memory_bytes=1, source="f"), ManifestOptions()
    )
    assert quick.sizing.startup_budget_seconds == 30
    assert quick.sizing.memory == "128Mi"


def test_autoscaler_budget_and_service_select_the_deployments_pods() -> None:
    files = _plan(min_replicas=3, max_replicas=9)
    deployment = files["deployment.yaml"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert files["service.yaml"]["spec"]["selector"] == selector
    assert files["poddisruptionbudget.yaml"]["spec"]["selector"]["matchLabels"] == selector
    hpa = files["horizontalpodautoscaler.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 9)
    # The autoscaler owns the count: re-applying the Deployment must not reset it.
    assert "replicas" not in deployment["spec"]
    pinned = _plan(min_replicas=3, max_replicas=9, replicas=4)["deployment.yaml"]
    assert pinned["spec"]["replicas"] == 4
    assert files["service.yaml"]["spec"]["ports"][0]["targetPort"] == "http"
    assert files["kustomization.yaml"]["resources"] == sorted(set(files) - {"kustomization.yaml"})


def test_labels_and_annotations_carry_the_model_and_provenance() -> None:
    files = _plan(namespace="ml")
    for name, obj in files.items():
        if name == "kustomization.yaml":
            assert obj["namespace"] == "ml"
            continue
        metadata = obj["metadata"]
        assert metadata["namespace"] == "ml"
        assert metadata["annotations"] == {k: v for k, v in LABELS.items() if k != "maintainer"}
        assert metadata["labels"]["packager.io/model-version"] == "3"
        assert metadata["labels"]["packager.io/model-run-id"] == "0a1b2c3d4e5f"
        # "Wine Quality" is no label value: it is in the annotations only.
        assert "packager.io/model-name" not in metadata["labels"]
        assert metadata["name"] == "wine-quality"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "Wine_Quality"}, "not a DNS label"),
        ({"namespace": "ML models"}, "not a DNS label"),
        ({"min_replicas": 0}, "1 <= min <= max"),
        ({"min_replicas": 4, "max_replicas": 2}, "1 <= min <= max"),
        ({"replicas": 9}, "outside"),
        ({"cpu": "lots"}, "expected CPUs"),
        ({"cpu": "0"}, "expected CPUs"),
    ],
)
def test_bad_options_are_usage_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _plan(**options)


def test_a_model_name_with_no_dns_letters_needs_a_name() -> None:
    image = _image(labels=(("io.packager.model.name", "42 ✓"),))
    with pytest.raises(UsageError, match="pass --name"):
        manifests.plan_manifests(image, MEASURED, ManifestOptions())
    plan = manifests.plan_manifests(image, MEASURED, ManifestOptions(name="m42"))
    assert plan.name == plan.files["service.yaml"]["metadata"]["name"] == "m42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1G", 10**9), ("1048576", 2**20)],
)
def test_memory_quantities(text: str, expected: int) -> None:
    assert inputs.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1.5Gi", "-1Mi", "10MB"])
def test_bad_memory_quantities(text: str) -> None:
    with pytest.raises(UsageError, match="--memory"):
        inputs.parse_memory(text)


# -- the measurements from `packager test --json` ---------------------------------------------


def _report(tmp_path: Path, **fields: Any) -> Path:
    report = {
        "image": "wine:3",
        "startup_seconds": 7.5,
        "latency_p50_ms": 3.0,
        "memory_bytes": 400 * 2**20,
        "model_digest": LABELS["io.packager.model.digest"],
        "passed": True,
    } | fields
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path


def test_a_test_report_gives_the_measurements(tmp_path: Path) -> None:
    measured = inputs.read_test_report(_report(tmp_path), _image())
    assert measured == Measured(
        startup_seconds=7.5, memory_bytes=400 * 2**20, source=str(tmp_path / "report.json")
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"passed": False}, "FAILED"),
        ({"model_digest": "sha256:" + "00" * 32}, "another model"),
        ({"memory_bytes": None}, "no memory"),
        ({"startup_seconds": None}, "not a `packager test --json` report"),
    ],
)
def test_unusable_test_reports_are_refused(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    path = _report(tmp_path, **fields)
    with pytest.raises(UsageError, match=message):
        inputs.read_test_report(path, _image())


def test_a_file_that_is_no_report_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"lock": 1}')
    with pytest.raises(UsageError, match="not a `packager test --json` report"):
        inputs.read_test_report(path, _image())
    path.write_text("{")
    with pytest.raises(UsageError, match="not a readable JSON report"):
        inputs.read_test_report(path, _image())


def test_built_from_another_model_is_refused() -> None:
    inputs.check_built_from(_image(), "models:/wine/3", LABELS["io.packager.model.digest"])
    with pytest.raises(UsageError, match="was not built from models:/wine/4"):
        inputs.check_built_from(_image(), "models:/wine/4", "sha256:" + "11" * 32)


# -- output -----------------------------------------------------------------------------------


def test_yaml_is_sorted_deterministic_and_alias_free() -> None:
    first = manifests.render(_plan())
    second = manifests.render(_plan())
    assert first == second
    deployment = first["deployment.yaml"]
    assert deployment.startswith(manifests.HEADER)
    assert "&id" not in deployment
    assert "*id" not in deployment
    top_keys = [line.split(":")[0] for line in deployment.splitlines() if line[:1].isalpha()]
    assert top_keys == sorted(top_keys)


def test_write_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "mine.yaml").write_text("keep")
    texts = manifests.render(_plan())
    with pytest.raises(UsageError, match="not empty"):
        manifests.write_directory(out, texts, force=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.yaml"]
    manifests.write_directory(out, texts, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]  # nothing left beside it


def test_a_failed_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    texts = {"a.yaml": "a: 1\n", "missing/b.yaml": "b: 2\n"}
    with pytest.raises(UsageError, match="cannot write"):
        manifests.write_directory(out, texts, force=False)
    assert list(tmp_path.iterdir()) == []
    # An existing directory is kept as it was.
    out.mkdir()
    (out / "old.yaml").write_text("old")
    with pytest.raises(UsageError, match="cannot write"):
        manifests.write_directory(out, texts, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["deploy"]
    assert (out / "old.yaml").read_text() == "old"


def test_write_manifests_reports_what_it_wrote(tmp_path: Path) -> None:
    written = manifests.write_manifests(
        _image(), MEASURED, ManifestOptions(format="kserve"), tmp_path / "out"
    )
    assert written.files == ("inferenceservice.yaml", "kustomization.yaml")
    assert written.image.endswith(DIGEST)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == list(written.files)


def test_flags_replace_what_the_report_measured(tmp_path: Path) -> None:
    report = _report(tmp_path)
    assert inputs.measurements(_image(), report=report) == inputs.read_test_report(report, _image())
    both = inputs.measurements(_image(), report=report, memory="1Gi")
    assert (both.startup_seconds, both.memory_bytes) == (7.5, 2**30)
    assert both.source.endswith("and flags")
    flags = inputs.measurements(_image(), startup_seconds=3, memory="300Mi")
    assert flags == Measured(startup_seconds=3, memory_bytes=300 * 2**20, source="flags")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "none was given"),
        ({"startup_seconds": 3}, "none was given"),
        ({"memory": "1Gi"}, "none was given"),
        ({"startup_seconds": 0, "memory": "1Gi"}, "must be positive"),
        ({"startup_seconds": float("nan"), "memory": "1Gi"}, "must be positive"),
    ],
)
def test_sizing_needs_measurements(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        inputs.measurements(_image(), **flags)


def test_kustomize_builds_the_base_and_the_readmes_patch(tmp_path: Path) -> None:
    """The README's overlay, built by the kustomize inside kubectl (offline): the base's
    kustomization lists every file, and the patch reaches the container."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl is not installed (apt-get install kubectl)")
        return
    manifests.write_manifests(
        _image(), MEASURED, ManifestOptions(namespace="ml"), tmp_path / "wine"
    )
    overlay = tmp_path / "prod"
    overlay.mkdir()
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("# deploy/prod/kustomization.yaml\n", 1)[1].split("```", 1)[0]
    (overlay / "kustomization.yaml").write_text(
        example.replace("name: wine}", "name: wine-quality}")
    )
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    documents = {d["kind"]: d for d in yaml.safe_load_all(built.stdout)}
    assert set(documents) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert {d["metadata"]["namespace"] for d in documents.values()} == {"ml"}
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["cpu"] == "4"
    assert container["resources"]["requests"]["cpu"] == "4"
    assert container["image"] == IMAGE.reference
