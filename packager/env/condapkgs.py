"""Every locked conda package, downloaded once, checked against its sha256, and cached.

Like the wheelhouse: archives live under ``<cache>/conda/pkgs/v1/sha256/<hex>/<file>``,
shared by every model, so a package is fetched once whatever model locks it. Nothing
unverified is cached: a download goes to a temporary directory, is hashed, compared with
the lock, and only then renamed into place.

The lock's URLs carry no credentials. A URL on a channel the user gave with credentials
(``--conda-channel https://USER:TOKEN@host/channel``) is fetched with them (same host, and
the URL under the channel's path); they travel in an ``Authorization`` header, never in a
URL that could be logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from packager.env.conda import CHANNEL_HINT, channel_secrets
from packager.env.condalock import CondaLock, CondaPackage
from packager.env.wheelhouse import store_by_sha256
from packager.errors import HashMismatchError, IndexAuthError, ResolutionError
from packager.redact import redact_uri, scrub

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_TIMEOUT = 60.0


@dataclass(frozen=True, kw_only=True)
class CondaFile:
    name: str
    version: str
    file_name: str
    sha256: str
    path: Path


@dataclass(frozen=True, kw_only=True)
class CondaPackages:
    files: tuple[CondaFile, ...]  # in the lock's order
    downloaded: int  # how many were fetched (the rest came from the cache)


class CondaStore:
    def __init__(self, cache_root: Path) -> None:
        self.root = cache_root / "conda" / "pkgs" / "v1" / "sha256"

    def find(self, package: CondaPackage) -> Path | None:
        path = self.root / package.sha256 / package.file_name
        return path if path.is_file() else None

    def add(self, file: Path, sha256: str) -> Path:
        return store_by_sha256(self.root, file, sha256) / file.name


def fetch_conda_packages(
    lock: CondaLock, *, channels: Sequence[str] = (), cache_root: Path
) -> CondaPackages:
    """Every package of ``lock`` from the cache, or downloaded and verified into it.

    ``channels`` are the user's channel URLs (they may carry credentials)."""
    store = CondaStore(cache_root)
    files: list[CondaFile] = []
    downloaded = 0
    with tempfile.TemporaryDirectory(prefix="packager-conda-") as tmp:
        for package in lock.packages:
            path = store.find(package)
            if path is None:
                fetched = _download(package, channels, Path(tmp))
                path = store.add(fetched, package.sha256)
                downloaded += 1
            files.append(
                CondaFile(
                    name=package.name,
                    version=package.version,
                    file_name=package.file_name,
                    sha256=package.sha256,
                    path=path,
                )
            )
    if downloaded:
        log.info("downloaded %d of %d conda packages", downloaded, len(lock.packages))
    return CondaPackages(files=tuple(files), downloaded=downloaded)


def _download(package: CondaPackage, channels: Sequence[str], work: Path) -> Path:
    destination = work / package.file_name
    url, authorization = _with_credentials(package.url, channels)
    shown = redact_uri(package.url)
    request = urllib.request.Request(url)  # noqa: S310 - file and http(s) URLs from the lock
    if authorization:
        request.add_header("Authorization", authorization)
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(request, timeout=_TIMEOUT) as response,  # noqa: S310
            destination.open("wb") as out,
        ):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise IndexAuthError(
                f"the conda channel refused {shown} ({err.code})", hint=CHANNEL_HINT
            ) from err
        raise ResolutionError(
            f"cannot download {shown}: HTTP {err.code}", hint=CHANNEL_HINT
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = scrub(str(getattr(err, "reason", err)), channel_secrets(channels))
        raise ResolutionError(f"cannot download {shown}: {reason}", hint=CHANNEL_HINT) from err
    if digest.hexdigest() != package.sha256:
        raise HashMismatchError(
            f"{package.file_name}: sha256 {digest.hexdigest()} is not the lock's "
            f"{package.sha256} for {package.name}={package.version}; nothing was cached",
            hint="the channel served a different file than when the lock was made; check "
            "the channel, or re-lock if the change is expected",
        )
    return destination


def _with_credentials(url: str, channels: Sequence[str]) -> tuple[str, str | None]:
    """The URL to fetch and its ``Authorization`` header, from the user's channel that
    holds it (same host, path under the channel's)."""
    target = urlsplit(url)
    for channel in channels:
        parts = urlsplit(channel)
        if "://" not in channel or parts.hostname != target.hostname or not parts.username:
            continue
        if parts.port != target.port or not target.path.startswith(parts.path.rstrip("/") + "/"):
            continue
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        plain = urlunsplit(target._replace(netloc=target.netloc.rpartition("@")[2]))
        return plain, f"Basic {token}"
    return url, None
