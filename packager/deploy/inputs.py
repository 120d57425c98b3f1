"""What manifests are made from: the image, pinned by digest, and the measurements.

:func:`read_image` asks the image's registry for the manifest a tag (or digest) names and
pins the digest it serves, then reads the image config for what the pod depends on: the
uid the image runs as (``runAsNonRoot`` can only be checked for a numeric one) and its
provenance labels. :func:`read_test_report` takes the start-up time and memory that
``packager test --json`` measured, after checking the report passed and is of this model.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from packager.errors import ForeignImageError, ImageNotFoundError, PushError, UsageError
from packager.image import registry

MODEL_LABEL = "io.packager.model.name"
DIGEST_LABEL = "io.packager.model.digest"
# The image's labels copied onto every resource as annotations: where it came from.
PROVENANCE_PREFIXES = ("org.opencontainers.image.", "io.packager.")

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MEMORY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_UNITS |= {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_CPU = re.compile(r"^(?:([0-9]+)m|([0-9]+(?:\.[0-9]{1,3})?))$")


@dataclass(frozen=True, kw_only=True)
class ImageFacts:
    reference: str  # REGISTRY/REPO@sha256:…: what the pods run, whatever the tag becomes
    uid: int
    gid: int | None
    labels: tuple[tuple[str, str], ...]  # the image's provenance labels, sorted


@dataclass(frozen=True, kw_only=True)
class Measured:
    startup_seconds: float
    memory_bytes: int
    source: str  # the report file, or "flags"


class RegistryReader(Protocol):
    """What :func:`read_image` needs of a registry (``registry.Client``, or a test's fake)."""

    def get_manifest(self, reference: str) -> tuple[bytes, str]: ...

    def fetch_blob(self, digest: str, destination: Path) -> None: ...


def read_image(
    reference: str,
    *,
    client_factory: Callable[[registry.Target], RegistryReader] = registry.Client,
) -> ImageFacts:
    """Pin ``REGISTRY/REPO:TAG`` (or ``@sha256:…``) to the digest its registry serves, and
    read the uid and provenance labels from the image's config."""
    name = reference.removeprefix("docker://")
    pinned = ""
    if "@" in name:
        name, _, pinned = name.partition("@")
        if not _DIGEST.match(pinned):
            raise UsageError(f"{reference}: {pinned!r} is not a sha256 digest")
    try:
        target = registry.parse_target(name)
        client = client_factory(target)
        body, media = client.get_manifest(pinned or target.tag)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if pinned and digest != pinned:
            raise ImageNotFoundError(f"the registry answered {digest} for {reference}")
        config = _config(client, json.loads(body), media)
    except PushError as err:  # the registry client speaks of pushes; this is a read
        raise ImageNotFoundError(
            f"cannot read {reference} from its registry: {err.message}",
            hint="manifests name an image a cluster pulls: push it first "
            "(packager build ... --push, or packager push), then pass REGISTRY/REPO:TAG "
            "or REGISTRY/REPO@sha256:DIGEST",
        ) from err
    labels = config.get("config", {}).get("Labels") or {}
    if MODEL_LABEL not in labels:
        raise ForeignImageError(
            f"{reference} was not built by packager: it has no io.packager.* labels",
            hint="packager manifests deploys images that packager build made",
        )
    uid, gid = _user(reference, str(config.get("config", {}).get("User") or ""))
    provenance = sorted(
        (str(k), str(v)) for k, v in labels.items() if str(k).startswith(PROVENANCE_PREFIXES)
    )
    return ImageFacts(
        reference=f"{target.registry}/{target.repository}@{digest}",
        uid=uid,
        gid=gid,
        labels=tuple(provenance),
    )


def _config(client: RegistryReader, manifest: dict[str, Any], media: str) -> dict[str, Any]:
    """The image config; from an index, the linux/amd64 image's (every platform of a
    packager image runs the same server as the same user)."""
    if media.endswith(("index.v1+json", "list.v2+json")) or "manifests" in manifest:
        entries = manifest.get("manifests", [])
        chosen = next(
            (m for m in entries if m.get("platform", {}).get("architecture") == "amd64"),
            entries[0] if entries else None,
        )
        if chosen is None:
            raise ImageNotFoundError("the image index lists no image")
        body, _ = client.get_manifest(chosen["digest"])
        manifest = json.loads(body)
    with tempfile.TemporaryDirectory(prefix="packager-config-") as tmp:
        path = Path(tmp) / "config.json"
        client.fetch_blob(manifest["config"]["digest"], path)
        config: dict[str, Any] = json.loads(path.read_bytes())
    return config


def _user(reference: str, user: str) -> tuple[int, int | None]:
    """``runAsNonRoot`` can only be checked by the kubelet for a numeric uid."""
    uid_text, _, gid_text = user.partition(":")
    if not uid_text.isdigit() or (gid_text and not gid_text.isdigit()):
        raise ForeignImageError(
            f"{reference} runs as {user or 'root (no USER)'!r}: the pod needs a numeric uid "
            "for runAsNonRoot",
            hint="packager's images run as 10001:10001; rebuild the image with packager",
        )
    if int(uid_text) == 0:
        raise ForeignImageError(f"{reference} runs as root (uid 0)")
    return int(uid_text), int(gid_text) if gid_text else None


def check_built_from(image: ImageFacts, model: str, model_digest: str) -> None:
    """``--model``: the image must serve that model's content (its digest label)."""
    labelled = dict(image.labels).get(DIGEST_LABEL)
    if labelled != model_digest:
        raise UsageError(
            f"{image.reference} was not built from {model}: it serves {labelled}, the model "
            f"is {model_digest}",
            hint="build and push the image from this model first",
        )


# -- measured inputs ------------------------------------------------------------------------


def read_test_report(path: Path, image: ImageFacts) -> Measured:
    """Start-up time and memory from ``packager test IMAGE --json``; the report must have
    passed and be of this image's model (its content digest)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--from-test {path}: not a readable JSON report ({err})") from err
    if not isinstance(report, dict) or not isinstance(report.get("startup_seconds"), int | float):
        raise UsageError(
            f"--from-test {path}: not a `packager test --json` report",
            hint="packager test IMAGE --json > report.json",
        )
    if report.get("passed") is not True:
        raise UsageError(f"--from-test {path}: that test FAILED; deploy an image that passes")
    labelled = dict(image.labels).get(DIGEST_LABEL)
    if report.get("model_digest") and labelled and report["model_digest"] != labelled:
        raise UsageError(
            f"--from-test {path} is of another model ({report['model_digest']}), not the "
            f"one {image.reference} serves ({labelled})",
            hint="run packager test on this image",
        )
    if report.get("memory_bytes") is None:
        raise UsageError(
            f"--from-test {path} has no memory measurement", hint="pass --memory as well"
        )
    return Measured(
        startup_seconds=float(report["startup_seconds"]),
        memory_bytes=int(report["memory_bytes"]),
        source=str(path),
    )


def measurements(
    image: ImageFacts,
    *,
    report: Path | None = None,
    startup_seconds: float | None = None,
    memory: str | None = None,
) -> Measured:
    """What to size from: a test report's measurements, each replaced by a flag given."""
    if startup_seconds is not None and not startup_seconds > 0:
        raise UsageError(f"--startup-seconds {startup_seconds:g}: must be positive")
    memory_bytes = parse_memory(memory) if memory is not None else None
    if report is None:
        if startup_seconds is None or memory_bytes is None:
            raise UsageError(
                "the manifests are sized from measurements, and none was given",
                hint="pass --from-test REPORT.json (packager test IMAGE --json > "
                "REPORT.json), or --startup-seconds and --memory",
            )
        return Measured(startup_seconds=startup_seconds, memory_bytes=memory_bytes, source="flags")
    found = read_test_report(report, image)
    if startup_seconds is None and memory_bytes is None:
        return found
    return Measured(
        startup_seconds=found.startup_seconds if startup_seconds is None else startup_seconds,
        memory_bytes=found.memory_bytes if memory_bytes is None else memory_bytes,
        source=f"{found.source} and flags",
    )


def parse_memory(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``2Gi``, ``1G``, bytes) in bytes."""
    match = _MEMORY.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--memory {text!r}: expected a size like 600Mi, 2Gi or 1G")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def parse_cpu(text: str) -> int:
    """A Kubernetes CPU quantity (``1``, ``1.5``, ``500m``) in millicores."""
    match = _CPU.match(text.strip())
    millicores = 0
    if match:
        milli, cores = match.groups()
        millicores = int(milli) if milli else round(float(cores) * 1000)
    if millicores <= 0:
        raise UsageError(f"--cpu {text!r}: expected CPUs like 1, 1.5 or 500m")
    return millicores
