"""Stage 6, ``publish``: push an image to any registry and record its digest.

Credentials come from where ``docker push`` finds them (``~/.docker/config.json`` and
its credential helpers) or from ``PACKAGER_REGISTRY_USERNAME`` and
``PACKAGER_REGISTRY_PASSWORD``; they are handed to the engine, never logged. A push
counts as done only when the registry confirms it with a digest: any error in the
engine's progress stream fails the push, so nothing half-pushed is reported as success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import PushError
from packager.image import engine
from packager.image.base import validate_reference
from packager.image.blobs import MANIFEST_MEDIA_TYPE, BlobStore, canonical_json
from packager.image.registry import Client, PushedBlobs, parse_target, push_image
from packager.redact import scrub

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Pushed:
    reference: str  # repository:tag as pushed
    digest: str  # sha256:... of the manifest the registry stored
    pinned: str  # repository@digest: what deployments should use


def push(reference: str, *, client: Any | None = None) -> Pushed:
    validate_reference(reference)
    repository, _, tag_name = reference.rpartition(":")
    if not repository or "/" in tag_name:
        repository, tag_name = reference, "latest"
    client = client or engine.connect()
    if not engine.image_exists(client, reference):
        raise PushError(
            f"{reference} is not an image in the local engine",
            hint="build it first with `packager build MODEL -t IMAGE:TAG`",
        )
    try:
        stream = list(
            client.api.push(
                repository,
                tag=tag_name,
                stream=True,
                decode=True,
                auth_config=_auth_from_environment(),
            )
        )
    except Exception as err:  # docker-py's APIError and connection errors alike
        raise PushError(f"pushing {reference} failed: {scrub(str(err))}") from err
    digest = None
    for chunk in stream:
        if "error" in chunk:
            detail = (chunk.get("errorDetail") or {}).get("message") or chunk["error"]
            raise PushError(
                f"the registry refused {reference}: {scrub(str(detail))}",
                hint="check the registry's address, that it accepts pushes, and the "
                "credentials (docker login, or PACKAGER_REGISTRY_USERNAME/PASSWORD)",
            )
        aux = chunk.get("aux") or {}
        if aux.get("Digest"):
            digest = str(aux["Digest"])
    if digest is None:
        raise PushError(
            f"the registry never confirmed {reference} with a digest",
            hint="the push did not complete; run it again",
        )
    return Pushed(reference=reference, digest=digest, pinned=f"{repository}@{digest}")


def _auth_from_environment() -> dict[str, str] | None:
    username = os.environ.get("PACKAGER_REGISTRY_USERNAME")
    password = os.environ.get("PACKAGER_REGISTRY_PASSWORD")
    if username and password:
        return {"username": username, "password": password}
    return None  # the engine's own credentials (docker login, helpers)


# -- the OCI backend's images, pushed from its blob store (``packager release``) ----------


def push_stored(reference: str, manifest_digest: str, store: BlobStore) -> PushedBlobs:
    """Push an image the OCI backend assembled into ``store``: its blobs, then the manifest
    under the reference's tag (:func:`packager.image.registry.push_image`)."""
    validate_reference(reference)
    manifest = store.path(manifest_digest).read_bytes()
    described = json.loads(manifest)
    digests = [described["config"]["digest"]] + [layer["digest"] for layer in described["layers"]]
    return push_image(
        reference,
        manifest,
        manifest_digest,
        str(described.get("mediaType") or MANIFEST_MEDIA_TYPE),
        [(digest, store.path(digest)) for digest in digests],
    )


def manifest_exists(pinned: str) -> bool:
    """Whether the registry in ``pinned`` (``REGISTRY/REPO@sha256:…``) holds that manifest.
    An unreachable registry is an error, not "absent": a release must not rebuild because
    the registry was down for a moment."""
    name, _, digest = pinned.partition("@")
    if not digest.startswith("sha256:"):
        raise PushError(f"{pinned} is not pinned by digest")
    client = Client(parse_target(f"{name}:probe"))
    try:
        client.get_manifest(digest)
    except PushError as err:
        if "(HTTP 404)" in err.message:
            return False
        raise
    return True


EMPTY_CONFIG = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "size": 2,
}


@dataclass(frozen=True, kw_only=True)
class PushedAttestation:
    kind: str  # "sbom" or "att" (cosign's tag suffixes)
    media_type: str  # of the document inside
    reference: str  # REGISTRY/REPO:sha256-<hex>.<kind>
    digest: str  # of the artifact's manifest
    pinned: str  # REGISTRY/REPO@digest
    document_digest: str  # of the document itself


def push_attestation(
    image: str, kind: str, media_type: str, document: bytes, scratch: Path
) -> PushedAttestation:
    """Push ``document`` as an OCI artifact whose ``subject`` is ``image``
    (``REGISTRY/REPO@sha256:…``), tagged ``sha256-<hex>.<kind>`` in the same repository.

    The subject lets registries with the referrers API list it; the tag is how tools
    (cosign, oras) find it on registries without that API, such as distribution 2.x.
    """
    name, _, digest = image.partition("@")
    target = parse_target(f"{name}:probe")
    subject_bytes, subject_type = Client(target).get_manifest(digest)
    document_path = scratch / f"{kind}.json"
    document_path.write_bytes(document)
    config_path = scratch / "empty.json"
    config_path.write_bytes(b"{}")
    document_digest = "sha256:" + hashlib.sha256(document).hexdigest()
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": media_type,
            "config": EMPTY_CONFIG,
            "layers": [
                {
                    "mediaType": media_type,
                    "digest": document_digest,
                    "size": len(document),
                    "annotations": {"org.opencontainers.image.title": document_path.name},
                }
            ],
            "annotations": {ATTESTATION_ANNOTATION: kind},
            "subject": {
                "mediaType": subject_type or MANIFEST_MEDIA_TYPE,
                "digest": digest,
                "size": len(subject_bytes),
            },
        }
    )
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    reference = f"{name}:{digest.replace(':', '-')}.{kind}"
    pushed = push_image(
        reference,
        manifest,
        manifest_digest,
        MANIFEST_MEDIA_TYPE,
        [(str(EMPTY_CONFIG["digest"]), config_path), (document_digest, document_path)],
    )
    return PushedAttestation(
        kind=kind,
        media_type=media_type,
        reference=reference,
        digest=manifest_digest,
        pinned=pushed.pinned,
        document_digest=document_digest,
    )


@dataclass(frozen=True, kw_only=True)
class FetchedAttestations:
    image: str  # REGISTRY/REPO@sha256:…
    labels: dict[str, str]  # from the image's config
    documents: dict[str, bytes]  # kind ("sbom", "att") → the document
    references: dict[str, str]  # kind → REGISTRY/REPO@sha256:… of the artifact


# The artifact type of each kind of attestation (what ``packager release`` pushes).
ATTESTATION_TYPES = {
    "sbom": "application/vnd.cyclonedx+json",
    "att": "application/vnd.in-toto+json",
}
# On packager's attestation manifests: which kind it is, so that a referrers listing (where
# other tools' SBOMs may share the artifact type) finds packager's own.
ATTESTATION_ANNOTATION = "io.packager.attestation"


def _attestation_manifest(client: Client, digest: str, kind: str) -> bytes:
    """The artifact's manifest: by its ``sha256-<hex>.<kind>`` tag, else (the tag deleted,
    or never pushed by the tool that attached it) through the referrers API, where the
    registry has it."""
    tag = f"{digest.replace(':', '-')}.{kind}"
    try:
        return client.get_manifest(tag)[0]
    except PushError:
        found = [
            m
            for m in client.referrers(digest, ATTESTATION_TYPES[kind]) or []
            if (m.get("annotations") or {}).get(ATTESTATION_ANNOTATION) == kind
        ]
        if not found:
            raise
        return client.get_manifest(str(found[0]["digest"]))[0]


def fetch_attestations(image: str, kinds: tuple[str, ...], scratch: Path) -> FetchedAttestations:
    """The image's config labels and the artifacts tagged ``sha256-<hex>.<kind>`` next to
    it (or listed by the referrers API), each checked to name ``image`` as its subject
    (blobs are digest-checked)."""
    name, _, digest = image.partition("@")
    if not digest.startswith("sha256:"):
        raise PushError(f"{image} is not pinned by digest", hint="pass REGISTRY/REPO@sha256:…")
    client = Client(parse_target(f"{name}:probe"))
    body, _ = client.get_manifest(digest)
    config_path = scratch / "config.json"
    client.fetch_blob(json.loads(body)["config"]["digest"], config_path)
    labels = json.loads(config_path.read_bytes()).get("config", {}).get("Labels") or {}
    documents: dict[str, bytes] = {}
    references: dict[str, str] = {}
    for kind in kinds:
        manifest_bytes = _attestation_manifest(client, digest, kind)
        manifest = json.loads(manifest_bytes)
        subject = (manifest.get("subject") or {}).get("digest")
        if subject != digest:
            raise PushError(f"{name}'s {kind} attestation is about {subject}, not {digest}")
        path = scratch / f"{kind}.json"
        client.fetch_blob(manifest["layers"][0]["digest"], path)
        documents[kind] = path.read_bytes()
        references[kind] = f"{name}@sha256:{hashlib.sha256(manifest_bytes).hexdigest()}"
    return FetchedAttestations(
        image=image, labels=dict(labels), documents=documents, references=references
    )
