"""Deploy stage, ``manifests``: Kubernetes (or KServe) manifests for a pushed image.

Plan, then write: :func:`plan_manifests` turns the image's facts (``inputs.read_image``)
and the measured start-up time and memory (a ``packager test --json`` report, or flags)
into plain objects, one per file, with no I/O; :func:`render` dumps them as YAML with
sorted keys, so two runs on the same inputs give the same bytes and a change reviews as a
small diff; :func:`write_directory` puts the files in place atomically.

What each setting follows from (see ``packager_server``): the server answers ``/livez``
while it loads and ``/readyz`` once loaded, so the startup probe waits on ``/readyz`` for a
multiple of the measured start-up; it writes nothing to disk (metrics and the connection
table are memfds), so the root file system is read-only and only ``/tmp`` (Python's and the
model libraries' temporary files) is an ``emptyDir``; it takes its worker count from the
CPU limit (``cpu.py``), which the Deployment also passes as ``PACKAGER_WORKERS`` through
the downward API (rounded up, as the server rounds the cgroup quota); on SIGTERM it drains
for ``PACKAGER_GRACEFUL_TIMEOUT`` seconds (and kills a worker still busy 5 s after), so the
pod's grace period covers the preStop pause, that drain, the kill and a margin.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from packager.deploy.inputs import MODEL_LABEL, ImageFacts, Measured, parse_cpu
from packager.errors import UsageError
from packager.stage import PORT
from packager_server.config import DEFAULT_GRACEFUL_TIMEOUT

Format = Literal["kubernetes", "kserve"]

# Kubernetes label keys for what the image's labels say (values must fit a label; the
# annotations always carry the full text).
LABEL_KEYS = {
    "io.packager.model.name": "packager.io/model-name",
    "io.packager.model.version": "packager.io/model-version",
    "io.packager.model.run-id": "packager.io/model-run-id",
}
PRE_STOP_SECONDS = 5  # for endpoints to drop the pod before the server stops accepting
# On SIGTERM the supervisor waits for its workers' drain (PACKAGER_GRACEFUL_TIMEOUT) plus
# 5 s before it kills one that has not stopped (supervisor.py); measured: 35.6 s from SIGTERM
# to exit 0 with the default 30 s when a worker had to be killed.
SUPERVISOR_KILL_AFTER_SECONDS = 5
GRACE_MARGIN_SECONDS = 5
STARTUP_FACTOR = 3.0  # a node may be slower than the machine `packager test` ran on
MIN_STARTUP_BUDGET = 30
STARTUP_PERIOD = 5
MEMORY_HEADROOM = 1.5  # request bodies, a respawned worker, a busier model than the test's
MEMORY_STEP = 16 * 2**20
MIN_MEMORY = 128 * 2**20
CPU_TARGET_UTILIZATION = 70
TMP_SIZE_LIMIT = "256Mi"
HEADER = "# Written by `packager manifests`. Patch it with kustomize rather than editing it.\n"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


@dataclass(frozen=True, kw_only=True)
class ManifestOptions:
    format: Format = "kubernetes"
    name: str | None = None  # default: the model's name, made a DNS label
    namespace: str | None = None
    cpu: str = "1"
    # Default: none in the Deployment, so that applying it again does not undo the
    # autoscaler's count (which starts at min_replicas).
    replicas: int | None = None
    min_replicas: int = 2
    max_replicas: int = 5


@dataclass(frozen=True, kw_only=True)
class Sizing:
    """The figures the manifests are sized to, reported by ``--json``."""

    startup_budget_seconds: int
    startup_failure_threshold: int
    memory: str
    cpu: str
    workers: int
    termination_grace_period_seconds: int


@dataclass(frozen=True, kw_only=True)
class Plan:
    name: str  # every resource's
    files: dict[str, dict[str, Any]]  # file name → the object it holds
    sizing: Sizing


@dataclass(frozen=True, kw_only=True)
class Written:
    directory: Path
    image: str
    name: str
    format: Format
    files: tuple[str, ...]
    sizing: Sizing
    measured_from: str


# -- the plan -------------------------------------------------------------------------------


def plan_manifests(image: ImageFacts, measured: Measured, options: ManifestOptions) -> Plan:
    """The files to write, as objects, and the sizing they follow; no I/O."""
    labels = dict(image.labels)
    name = resource_name(options.name, labels[MODEL_LABEL])
    if options.namespace is not None and not _NAMESPACE.match(options.namespace):
        raise UsageError(f"--namespace {options.namespace!r} is not a DNS label")
    _check_replicas(options)
    sizing = _sizing(measured, options.cpu)
    metadata = _metadata(name, options.namespace, labels)
    pod = _pod(image, sizing, kserve=options.format == "kserve")
    if options.format == "kserve":
        files = {"inferenceservice.yaml": _inference_service(metadata, pod, options)}
    else:
        files = {
            "deployment.yaml": _deployment(metadata, pod, name, options),
            "service.yaml": _service(metadata, name),
            "horizontalpodautoscaler.yaml": _autoscaler(metadata, name, options),
            "poddisruptionbudget.yaml": _disruption_budget(metadata, name),
        }
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files),
    }
    if options.namespace:
        kustomization["namespace"] = options.namespace
    return Plan(name=name, files={**files, "kustomization.yaml": kustomization}, sizing=sizing)


def resource_name(given: str | None, model: str) -> str:
    """``given`` (checked), else the model's name made a DNS label."""
    if given is not None:
        if not _DNS_LABEL.match(given):
            raise UsageError(
                f"--name {given!r} is not a DNS label",
                hint="lower-case letters, digits and '-', starting with a letter, at most 63",
            )
        return given
    name = re.sub(r"[^a-z0-9]+", "-", model.lower()).lstrip("-0123456789")[:63].strip("-")
    if not name:
        raise UsageError(f"the model name {model!r} gives no DNS name", hint="pass --name NAME")
    return name


def _check_replicas(options: ManifestOptions) -> None:
    if options.min_replicas < 1 or options.max_replicas < options.min_replicas:
        raise UsageError(
            f"--min-replicas {options.min_replicas} --max-replicas {options.max_replicas}: "
            "need 1 <= min <= max"
        )
    replicas = options.replicas
    if replicas is not None and not options.min_replicas <= replicas <= options.max_replicas:
        raise UsageError(f"--replicas {replicas} is outside --min-replicas..--max-replicas")


def _sizing(measured: Measured, cpu: str) -> Sizing:
    if not measured.startup_seconds > 0 or measured.memory_bytes <= 0:
        raise UsageError("the start-up time and memory must be positive")
    budget = max(MIN_STARTUP_BUDGET, math.ceil(STARTUP_FACTOR * measured.startup_seconds))
    threshold = math.ceil(budget / STARTUP_PERIOD)
    memory = max(MIN_MEMORY, measured.memory_bytes * MEMORY_HEADROOM)
    mebibytes = math.ceil(memory / MEMORY_STEP) * MEMORY_STEP // 2**20
    millicores = parse_cpu(cpu)
    return Sizing(
        startup_budget_seconds=threshold * STARTUP_PERIOD,
        startup_failure_threshold=threshold,
        memory=f"{mebibytes}Mi",
        cpu=str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m",
        workers=math.ceil(millicores / 1000),
        termination_grace_period_seconds=math.ceil(
            PRE_STOP_SECONDS
            + DEFAULT_GRACEFUL_TIMEOUT
            + SUPERVISOR_KILL_AFTER_SECONDS
            + GRACE_MARGIN_SECONDS
        ),
    )


def _metadata(name: str, namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
    kube_labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/managed-by": "packager",
    }
    for image_key, label_key in LABEL_KEYS.items():
        value = labels.get(image_key, "")
        if value and len(value) <= 63 and _LABEL_VALUE.match(value):
            kube_labels[label_key] = value
    if "packager.io/model-version" in kube_labels:
        kube_labels["app.kubernetes.io/version"] = kube_labels["packager.io/model-version"]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": kube_labels,
        "annotations": dict(labels),
    }
    if namespace:
        metadata["namespace"] = namespace
    return metadata


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "model-server"}


def _probe(path: str, port: int | str, *, period: int, timeout: int, failures: int) -> Any:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _pod(image: ImageFacts, sizing: Sizing, *, kserve: bool) -> dict[str, Any]:
    """The pod spec both formats share (KServe's predictor is a pod spec)."""
    port: int | str = PORT if kserve else "http"
    user: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": image.uid}
    if image.gid is not None:
        user["runAsGroup"] = image.gid
    resources = {"cpu": sizing.cpu, "memory": sizing.memory}
    container = {
        "name": "kserve-container" if kserve else "server",
        "image": image.reference,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http1" if kserve else "http", "containerPort": PORT}],
        "env": [
            {"name": "PACKAGER_GRACEFUL_TIMEOUT", "value": f"{DEFAULT_GRACEFUL_TIMEOUT:g}"},
            {
                # The server reads the cgroup quota too; this says it in the manifest, and
                # follows a patched limit (rounded up, as the server rounds the quota).
                "name": "PACKAGER_WORKERS",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
            },
        ],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "startupProbe": _probe(
            "/readyz",
            port,
            period=STARTUP_PERIOD,
            timeout=2,
            failures=sizing.startup_failure_threshold,
        ),
        "readinessProbe": _probe("/readyz", port, period=5, timeout=5, failures=3),
        "livenessProbe": _probe("/livez", port, period=10, timeout=5, failures=6),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "securityContext": {
            **user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108 - an emptyDir
    }
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": sizing.termination_grace_period_seconds,
        "securityContext": {**user, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}}],
    }


def _deployment(
    metadata: dict[str, Any], pod: dict[str, Any], name: str, options: ManifestOptions
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(name)},
        # A new version takes traffic only once ready; none of the old is lost first.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {"labels": metadata["labels"], "annotations": metadata["annotations"]},
            "spec": pod,
        },
    }
    if options.replicas is not None:
        spec["replicas"] = options.replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def _service(metadata: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(name),
            "ports": [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def _autoscaler(metadata: dict[str, Any], name: str, options: ManifestOptions) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": CPU_TARGET_UTILIZATION,
                        },
                    },
                }
            ],
        },
    }


def _disruption_budget(metadata: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata,
        # One pod at a time: a node drain never takes the whole model down, and a
        # single-replica deployment never blocks a drain.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(name)}},
    }


def _inference_service(
    metadata: dict[str, Any], pod: dict[str, Any], options: ManifestOptions
) -> dict[str, Any]:
    # A plain Deployment under KServe ("RawDeployment"; newer releases also call it
    # "Standard" and accept this name): Knative's serverless mode refuses lifecycle hooks.
    annotations = {**metadata["annotations"], "serving.kserve.io/deploymentMode": "RawDeployment"}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {**metadata, "annotations": annotations},
        "spec": {
            "predictor": {
                **pod,
                "minReplicas": options.min_replicas,
                "maxReplicas": options.max_replicas,
                "scaleMetric": "cpu",
                "scaleTarget": CPU_TARGET_UTILIZATION,
            }
        },
    }


class _Dumper(yaml.SafeDumper):
    """Every value written out in full: a YAML alias (``&id001``) where the Deployment
    and its pod template share labels would be correct but unreadable in a review."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - PyYAML's signature
        return True


def render(files: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """YAML with sorted keys and no line folding: the same inputs give the same bytes."""
    return {
        name: HEADER
        + yaml.dump(
            dict(obj),
            Dumper=_Dumper,
            sort_keys=True,
            default_flow_style=False,
            allow_unicode=True,
            width=2**16,
        )
        for name, obj in sorted(files.items())
    }


def write_directory(directory: Path, texts: Mapping[str, str], *, force: bool) -> None:
    """Write every file into a new sibling directory, then rename it into place: a reader
    sees the old directory or the complete new one, never a mix. A non-empty directory is
    replaced only with ``force``."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"-o {directory}: exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UsageError(
            f"-o {directory} is not empty", hint="pass --force to replace what it holds"
        )
    parent = directory.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    except OSError as err:
        raise UsageError(f"cannot write {directory}: {err.strerror}") from err
    old = parent / f".{directory.name}.old-{os.getpid()}"
    try:
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        if directory.is_dir():
            directory.rename(old)
        staging.rename(directory)
    except OSError as err:
        if old.exists() and not directory.exists():
            old.rename(directory)
        raise UsageError(f"cannot write {directory}: {err.strerror}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_manifests(
    image: ImageFacts,
    measured: Measured,
    options: ManifestOptions,
    directory: Path,
    *,
    force: bool = False,
) -> Written:
    """Plan, render and write the manifests for ``image`` into ``directory``."""
    plan = plan_manifests(image, measured, options)
    texts = render(plan.files)
    write_directory(directory, texts, force=force)
    return Written(
        directory=directory,
        image=image.reference,
        name=plan.name,
        format=options.format,
        files=tuple(sorted(texts)),
        sizing=plan.sizing,
        measured_from=measured.source,
    )
