"""``--dispatch``: hand each release to the cluster instead of running it here.

The receiver stays the durable front door (verify, queue, retry); the build runs where the
team already runs work. The dispatcher here writes one Kubernetes ``batch/v1`` Job per
release, running ``packager release`` for the job's model and image in the packager image,
into a directory (applied by ``kubectl apply -f DIR``, a GitOps controller, or a sidecar)
or to a stream (``--dispatch k8s-jobs:-`` for ``| kubectl apply -f -``).

The Job's name comes from the job's key (model and image) and the queue's job id and
attempt: a retry is a new Job (a finished Job is immutable, so reusing its name would
dispatch nothing), and the release it runs answers "already released" when an earlier
attempt got through. Credentials never enter the manifest: a tracking or registry URI that
holds any is refused (the Job could not use it redacted); ``--dispatch-secret`` names a
Secret whose keys become the container's environment (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``PACKAGER_REGISTRY_USERNAME`` …).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from packager.errors import UsageError
from packager.redact import redact_uri
from packager.webhook.rules import JobSpec

KIND = "k8s-jobs"
HEADER = "# Written by packager webhook serve --dispatch; one Job per release.\n"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_NAME_ROOM = 63 - len("packager-release--") - 8  # a label value's limit, less prefix, hash


@dataclass(frozen=True, kw_only=True)
class JobTemplate:
    """What every dispatched Job shares."""

    packager_image: str  # the image whose entrypoint path has `packager`
    tracking_uri: str  # without credentials (refused otherwise)
    registry_uri: str | None = None  # MLflow's model registry, when not the tracking server
    namespace: str | None = None
    env_from_secret: str | None = None  # a Secret whose keys become the container's environment
    release_args: tuple[str, ...] = ()  # e.g. ("--base-image", "…"), from the serve flags

    def __post_init__(self) -> None:
        for flag, uri in (("tracking", self.tracking_uri), ("registry", self.registry_uri)):
            if uri and redact_uri(uri) != uri:
                raise UsageError(
                    f"--dispatch: the {flag} URI {redact_uri(uri)} holds credentials, which "
                    "a dispatched Job must not carry (and could not use once removed)",
                    hint=f"pass the {flag} URI without them and put MLFLOW_TRACKING_USERNAME/"
                    "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the Secret "
                    "named by --dispatch-secret",
                )


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where manifests go: a directory, or ``None`` for the stream."""

    directory: Path | None


def parse_target(value: str) -> Target:
    """``k8s-jobs:DIR`` or ``k8s-jobs:-``."""
    kind, sep, where = value.partition(":")
    if kind != KIND or not sep or not where:
        raise UsageError(
            f"--dispatch {value!r}: unknown dispatcher",
            hint=f"use --dispatch {KIND}:DIR (one Job manifest per release) or {KIND}:- (stdout)",
        )
    return Target(directory=None if where == "-" else Path(where))


def job_name(spec: JobSpec, *, job_id: int | None = None, attempt: int | None = None) -> str:
    """``packager-release-<name>-<version>-<hash>[-<job>-<attempt>]``: a DNS label, at
    most 63 characters, the same for the same model, image, queue job and attempt."""
    suffix = "" if job_id is None else f"-{job_id}-{attempt or 0}"
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{spec.name}-{spec.version}".lower()).strip("-")
    readable = readable[: _NAME_ROOM - len(suffix)].rstrip("-") or "model"
    digest = hashlib.sha256(spec.key.encode()).hexdigest()[:8]
    return f"packager-release-{readable}-{digest}{suffix}"


def release_args(spec: JobSpec) -> list[str]:
    """``packager release``'s arguments for the job, as its rule chose them."""
    choices = spec.release
    args = ["release", spec.model, "-t", spec.image, "--backend", choices.backend]
    if not choices.test:
        args.append("--no-test")
    if not choices.attestations:
        args.append("--no-attestations")
    if choices.alias:
        args += ["--alias", choices.alias]
    if choices.force:
        args.append("--force")
    return args


def job_manifest(
    spec: JobSpec, template: JobTemplate, *, job_id: int | None = None, attempt: int | None = None
) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs the release: non-root, no privilege, read-only root
    file system with scratch volumes, no retries of its own beyond two (the queue keeps
    the job's record), cleaned up a day after it finishes."""
    name = job_name(spec, job_id=job_id, attempt=attempt)
    labels = {
        "app.kubernetes.io/name": "packager-release",
        "app.kubernetes.io/managed-by": "packager-webhook",
    }
    metadata: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "annotations": {"packager.io/model": spec.model, "packager.io/image": spec.image},
    }
    if template.namespace:
        metadata["namespace"] = template.namespace
    container: dict[str, Any] = {
        "name": "release",
        "image": template.packager_image,
        "command": ["packager"],
        "args": [*release_args(spec), *template.release_args],
        "env": [
            {"name": "MLFLOW_TRACKING_URI", "value": redact_uri(template.tracking_uri)},
            *(
                [{"name": "MLFLOW_REGISTRY_URI", "value": redact_uri(template.registry_uri)}]
                if template.registry_uri
                else []
            ),
            {"name": "PACKAGER_CACHE_DIR", "value": "/cache"},
            {"name": "HOME", "value": "/tmp"},  # noqa: S108 — an emptyDir in the pod
        ],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        ],
    }
    if template.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": template.env_from_secret}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "cache", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def render(manifest: Mapping[str, Any]) -> str:
    """Sorted YAML: the same job gives the same bytes (libyaml's emitter where PyYAML has
    it: the pure-Python one costs a millisecond of the receiver's CPU per Job)."""
    return HEADER + yaml.dump(
        dict(manifest), Dumper=_DUMPER, sort_keys=True, default_flow_style=False
    )


class KubernetesJobs:
    """A release function (:data:`packager.webhook.worker.ReleaseFn`) that writes the
    job's manifest instead of releasing: atomically into ``target.directory`` as
    ``NAME.yaml``, or as one YAML document on ``stream``."""

    def __init__(self, target: Target, template: JobTemplate, stream: TextIO | None = None) -> None:
        if target.directory is None and stream is None:
            raise UsageError("--dispatch k8s-jobs:- needs a stream to write to")
        if target.directory is not None:
            try:
                target.directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(
                    f"--dispatch: cannot create {target.directory}: {err.strerror}"
                ) from err
        self.target = target
        self.template = template
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, spec: JobSpec) -> str:
        return self.release_attempt(spec)

    def release_attempt(
        self, spec: JobSpec, *, job_id: int | None = None, attempt: int | None = None
    ) -> str:
        """Dispatch one attempt of a queued job (the worker pool calls this, with the
        job's id and attempt, so that each attempt is its own Job)."""
        text = render(job_manifest(spec, self.template, job_id=job_id, attempt=attempt))
        name = job_name(spec, job_id=job_id, attempt=attempt)
        if self.target.directory is None:
            stream = self._stream
            if stream is None:  # pragma: no cover - refused in __init__
                raise UsageError("--dispatch k8s-jobs:- needs a stream to write to")
            with self._lock:
                stream.write("---\n" + text)
                stream.flush()
            return f"dispatched: Job {name}"
        path = self.target.directory / f"{name}.yaml"
        fd, staging = tempfile.mkstemp(dir=self.target.directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            Path(staging).replace(path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return f"dispatched: Job {name} in {path}"
