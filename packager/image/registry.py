"""A small client for the OCI distribution API: push an image, pull a base image's blobs.

Used by the OCI backend, which has no engine to push or pull with. Only blobs the registry does
not have are uploaded (``HEAD`` first, then a monolithic upload), and the manifest goes
last, so a registry never holds a tag whose blobs are missing; the digest the registry
answers with must be the one computed locally.

Loopback registries (``localhost``, ``127.0.0.1``, ``[::1]``) are spoken to over plain
HTTP, as the Docker engine does; every other registry over HTTPS. Credentials come from
``PACKAGER_REGISTRY_USERNAME``/``PACKAGER_REGISTRY_PASSWORD`` or the Docker config
(``auths`` entries and credential helpers). Basic and bearer-token challenges are both
answered. No credential is logged or put in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import PushError
from packager.redact import scrub

log = logging.getLogger(__name__)

_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_TIMEOUT = 300


@dataclass(frozen=True)
class Target:
    registry: str  # host[:port]
    repository: str
    tag: str


def parse_target(reference: str) -> Target:
    """``host[:port]/name[:tag]``; a name without a registry host is refused."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        name, tag = reference, "latest"
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        raise PushError(
            f"{reference} names no registry",
            hint="push to a registry address, e.g. registry.example.com/team/wine:3 or "
            "127.0.0.1:5000/wine:3",
        )
    return Target(registry=first, repository=rest, tag=tag)


def _base_url(registry: str) -> str:
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry
    scheme = "http" if host in _LOOPBACK or registry.startswith("[::1]") else "https"
    return f"{scheme}://{registry}"


def credentials(registry: str) -> tuple[str, str] | None:
    username = os.environ.get("PACKAGER_REGISTRY_USERNAME")
    password = os.environ.get("PACKAGER_REGISTRY_PASSWORD")
    if username and password:
        return username, password
    config_dir = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker"))
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    helper = (config.get("credHelpers") or {}).get(registry) or config.get("credsStore")
    if helper:
        found = _from_helper(str(helper), registry)
        if found:
            return found
    for key, entry in (config.get("auths") or {}).items():
        if key == registry or urllib.parse.urlsplit(key).netloc == registry:
            token = entry.get("auth")
            if token:
                user, _, secret = base64.b64decode(token).decode().partition(":")
                return user, secret
    return None


def _from_helper(helper: str, registry: str) -> tuple[str, str] | None:
    try:
        done = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=registry,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    data = json.loads(done.stdout)
    return str(data.get("Username", "")), str(data.get("Secret", ""))


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.base = _base_url(target.registry)
        self.authorization: str | None = None

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = _http_only(path_or_url if "://" in path_or_url else self.base + path_or_url)
        for attempt in (1, 2):
            request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
            for key, value in (headers or {}).items():
                request.add_header(key, value)
            if self.authorization:
                request.add_header("Authorization", self.authorization)
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:  # noqa: S310
                    return response.status, dict(response.headers.items()), response.read()
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 1 and self._authenticate(err.headers):
                    if hasattr(data, "seek"):
                        data.seek(0)
                    continue
                return err.code, dict(err.headers.items()), err.read()
            except (urllib.error.URLError, OSError) as err:
                raise PushError(
                    f"cannot reach the registry {self.target.registry}: {scrub(str(err))}",
                    hint="check the address; loopback registries use HTTP, others HTTPS",
                ) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _authenticate(self, headers: Any) -> bool:
        challenge = str(headers.get("WWW-Authenticate", ""))
        found = credentials(self.target.registry)
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if found is None:
                return False
            token = base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode()
            self.authorization = f"Basic {token}"
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(part.split("=", 1) for part in _split_params(params) if "=" in part)
        fields = {k.strip(): v.strip().strip('"') for k, v in fields.items()}
        query = {"service": fields.get("service", "")}
        query["scope"] = fields.get("scope", f"repository:{self.target.repository}:pull,push")
        url = _http_only(fields.get("realm", "") + "?" + urllib.parse.urlencode(query))
        request = urllib.request.Request(url)  # noqa: S310 - http(s) only, checked above
        if found is not None:
            token = base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise PushError(
                f"the registry {self.target.registry} refused to issue a token",
                hint="check the credentials (docker login, or PACKAGER_REGISTRY_USERNAME/PASSWORD)",
            ) from err
        self.authorization = "Bearer " + str(answer.get("token") or answer.get("access_token"))
        return True

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """The manifest (or index) bytes for a tag or digest, and its media type."""
        status, headers, body = self._request(
            "GET",
            f"/v2/{self.target.repository}/manifests/{reference}",
            headers={"Accept": ", ".join(_MANIFEST_TYPES)},
        )
        if status != 200:
            raise self._refused(
                f"the manifest of {self.target.repository}:{reference}", status, body
            )
        return body, headers.get("Content-Type", "").split(";")[0]

    def referrers(self, digest: str, artifact_type: str) -> list[dict[str, Any]] | None:
        """The descriptors of the manifests whose ``subject`` is ``digest`` and whose
        artifact type is ``artifact_type``, from the OCI 1.1 referrers API; ``None`` where
        the registry lacks that API (distribution 2.x answers 404)."""
        status, _, body = self._request(
            "GET",
            f"/v2/{self.target.repository}/referrers/{digest}?artifactType="
            + urllib.parse.quote(artifact_type, safe=""),
            headers={"Accept": "application/vnd.oci.image.index.v1+json"},
        )
        if status != 200:
            return None
        try:
            index = json.loads(body)
        except ValueError:
            return None
        return [
            m
            for m in index.get("manifests", [])
            if isinstance(m, dict) and m.get("artifactType") == artifact_type
        ]

    def fetch_blob(self, digest: str, destination: Path) -> None:
        """Download a blob to ``destination``, checking its digest."""
        url = _http_only(f"{self.base}/v2/{self.target.repository}/blobs/{digest}")
        for attempt in (1, 2):
            request = urllib.request.Request(url)  # noqa: S310 - http(s) only, checked above
            if self.authorization:
                request.add_header("Authorization", self.authorization)
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:  # noqa: S310
                    hasher = hashlib.sha256()
                    with destination.open("wb") as out:
                        for block in iter(lambda: response.read(1 << 20), b""):
                            hasher.update(block)
                            out.write(block)
                break
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 1 and self._authenticate(err.headers):
                    continue
                raise self._refused(f"the blob {digest}", err.code, err.read()) from err
            except (urllib.error.URLError, OSError) as err:
                raise PushError(
                    f"cannot read from the registry {self.target.registry}: {scrub(str(err))}"
                ) from err
        if "sha256:" + hasher.hexdigest() != digest:
            destination.unlink(missing_ok=True)
            raise PushError(f"the registry sent a blob that does not match {digest}")

    def has_blob(self, digest: str) -> bool:
        status, _, _ = self._request("HEAD", f"/v2/{self.target.repository}/blobs/{digest}")
        return status == 200

    def upload_blob(self, digest: str, path: Path) -> None:
        status, headers, body = self._request(
            "POST", f"/v2/{self.target.repository}/blobs/uploads/", data=b""
        )
        if status != 202 or "Location" not in headers:
            raise self._refused(f"starting the upload of {digest}", status, body)
        location = urllib.parse.urljoin(self.base + "/", headers["Location"])
        separator = "&" if "?" in location else "?"
        with path.open("rb") as stream:
            status, _, body = self._request(
                "PUT",
                f"{location}{separator}digest={urllib.parse.quote(digest)}",
                data=stream,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
            )
        if status not in (201, 204):
            raise self._refused(f"uploading {digest}", status, body)

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        status, headers, body = self._request(
            "PUT",
            f"/v2/{self.target.repository}/manifests/{self.target.tag}",
            data=manifest,
            headers={"Content-Type": media_type},
        )
        if status not in (200, 201):
            raise self._refused("storing the manifest", status, body)
        return headers.get("Docker-Content-Digest", "")

    def _refused(self, what: str, status: int, body: bytes) -> PushError:
        detail = scrub(body.decode("utf-8", "replace")[:500])
        hint = (
            "check the credentials (docker login, or PACKAGER_REGISTRY_USERNAME/PASSWORD)"
            if status in (401, 403)
            else "check that the registry accepts pushes to this repository"
        )
        return PushError(
            f"the registry {self.target.registry} refused {what} (HTTP {status}): {detail}",
            hint=hint,
        )


def _http_only(url: str) -> str:
    """Registries and token services are HTTP(S); refuse anything else they point us to."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise PushError(f"the registry pointed to a non-HTTP address: {scrub(url)[:200]}")
    return url


def _split_params(params: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in params:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


@dataclass(frozen=True, kw_only=True)
class PushedBlobs:
    reference: str
    digest: str
    pinned: str
    uploaded: int  # blobs sent
    skipped: int  # blobs the registry already had


def push_image(
    reference: str,
    manifest: bytes,
    manifest_digest: str,
    media_type: str,
    blobs: list[tuple[str, Path]],
) -> PushedBlobs:
    """Upload missing ``blobs`` (digest, file), then the manifest under the reference's tag."""
    target = parse_target(reference)
    client = Client(target)
    uploaded = skipped = 0
    seen: set[str] = set()
    for digest, path in blobs:
        if digest in seen:
            continue
        seen.add(digest)
        if client.has_blob(digest):
            skipped += 1
            continue
        log.info("uploading %s (%.1f MiB)", digest[:19], path.stat().st_size / 2**20)
        client.upload_blob(digest, path)
        uploaded += 1
    stored = client.put_manifest(manifest, media_type)
    if stored and stored != manifest_digest:
        raise PushError(
            f"the registry stored the manifest as {stored}, not {manifest_digest}",
            hint="the registry rewrote the manifest; pin the digest it reports instead",
        )
    name = f"{target.registry}/{target.repository}"
    return PushedBlobs(
        reference=reference,
        digest=manifest_digest,
        pinned=f"{name}@{manifest_digest}",
        uploaded=uploaded,
        skipped=skipped,
    )
