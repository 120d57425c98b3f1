"""Stage 8, ``record``: write which image serves a model version into MLflow's registry.

A sibling of :mod:`packager.source` (the other module that talks to MLflow), through the
same door: MLflow's client, reached after the fail-fast probe, its errors translated
into packager's. Tags go first and the alias last, so an alias never points at a version
whose tags do not name its image yet. Nothing here touches the image registry: when the
model registry refuses, the error says that the pushed image stays where it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from packager.errors import PackagerError, RecordError, UsageError
from packager.redact import redact_uri, scrub
from packager.source import Provenance, RegistryOptions, _check_reachable, _Resolver

IMAGE_TAG = "packager.image"
LOCK_DIGEST_TAG = "packager.lock_digest"
BASE_DIGEST_TAG = "packager.base_digest"
VERSION_TAG = "packager.version"


@dataclass(frozen=True, kw_only=True)
class Recorded:
    """What a release wrote, and where."""

    registry_uri: str  # without credentials
    model_name: str
    model_version: str
    tags: Mapping[str, str]
    alias: str | None


@dataclass(frozen=True, kw_only=True)
class VersionRef:
    """A registered model version and the registry that holds it."""

    name: str
    version: str
    tracking_uri: str
    registry_uri: str


def version_of(provenance: Provenance, options: RegistryOptions | None) -> VersionRef:
    """The registered version a release records into; other references are refused."""
    if provenance.model_name is None or provenance.model_version is None:
        raise UsageError(
            f"{provenance.reference} is not a registered model version, so a release has "
            "nowhere to record its image",
            hint="release models:/NAME/VERSION or models:/NAME@ALIAS",
        )
    options = options or RegistryOptions()
    tracking = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    registry = options.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return VersionRef(
        name=provenance.model_name,
        version=provenance.model_version,
        tracking_uri=tracking,
        registry_uri=registry,
    )


def version_tags(ref: VersionRef) -> dict[str, str]:
    """The version's tags as the registry holds them now (not the cached provenance's)."""
    client = _client(ref)
    version = _call(ref, lambda: client.client.get_model_version(ref.name, ref.version), "")
    return {str(k): str(v) for k, v in (version.tags or {}).items()}


def record_release(
    ref: VersionRef, tags: Mapping[str, str], *, alias: str | None, image: str
) -> Recorded:
    """Set ``tags`` on the version, then move ``alias`` to it. ``image`` (the pushed
    ``repo@sha256:…``) is named in any error: it stays in the registry either way."""
    client = _client(ref)
    for key, value in tags.items():
        _call(
            ref,
            lambda k=key, v=value: client.client.set_model_version_tag(ref.name, ref.version, k, v),
            image,
        )
    if alias is not None:
        move_alias(ref, alias, image=image, client=client)
    return Recorded(
        registry_uri=redact_uri(ref.registry_uri),
        model_name=ref.name,
        model_version=ref.version,
        tags=dict(tags),
        alias=alias,
    )


def move_alias(
    ref: VersionRef, alias: str, *, image: str, client: _Resolver | None = None
) -> Recorded:
    """Point ``alias`` at the version (a no-op when it already does: a re-run of a
    release interrupted between its tags and its alias finishes the job)."""
    resolver = client or _client(ref)
    _call(
        ref,
        lambda: resolver.client.set_registered_model_alias(ref.name, alias, ref.version),
        image,
    )
    return Recorded(
        registry_uri=redact_uri(ref.registry_uri),
        model_name=ref.name,
        model_version=ref.version,
        tags={},
        alias=alias,
    )


def _client(ref: VersionRef) -> _Resolver:
    _check_reachable(ref.tracking_uri)
    if ref.registry_uri != ref.tracking_uri:
        _check_reachable(ref.registry_uri)
    return _Resolver(tracking_uri=ref.tracking_uri, registry_uri=ref.registry_uri)


def _call(ref: VersionRef, fn: Any, image: str) -> Any:
    """One MLflow call; its failure becomes a packager error that says what stays."""
    kept = f"; the pushed image {image} stays in place" if image else ""
    try:
        return fn()
    except PackagerError:
        raise
    except Exception as err:
        text = scrub(str(err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        code = str(getattr(err, "error_code", ""))
        where = f"{ref.name} version {ref.version} at {redact_uri(ref.registry_uri)}"
        if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text.lower():
            raise RecordError(
                f"{where} no longer exists (deleted meanwhile?): {text}{kept}",
                hint="register the model again and release the new version",
            ) from err
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or any(
            marker in text for marker in (" 401", " 403", "Unauthorized", "Forbidden")
        ):
            raise RecordError(
                f"the registry refused to record {where}: {text}{kept}",
                hint="the credentials need permission to edit this model's versions "
                "(MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD)",
            ) from err
        raise RecordError(f"recording {where} failed: {text}{kept}") from err
