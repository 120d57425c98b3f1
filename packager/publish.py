"""Stage 6, ``publish``: push an image to any registry and record its digest.

Credentials come from where ``docker push`` finds them (``~/.docker/config.json`` and
its credential helpers) or from ``PACKAGER_REGISTRY_USERNAME`` and
``PACKAGER_REGISTRY_PASSWORD``; they are handed to the engine, never logged. A push
counts as done only when the registry confirms it with a digest: any error in the
engine's progress stream fails the push, so nothing half-pushed is reported as success.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from packager.errors import PushError
from packager.image import engine
from packager.image.base import validate_reference
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
