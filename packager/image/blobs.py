"""Content-addressed storage for the OCI backend: blobs by sha256, and layers by a key of
what went into them (so a warm rebuild writes nothing). Canonical JSON for manifests and
configs: sorted keys, no spaces, the same bytes on every machine."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path

from packager.image.layers import (
    Entry,
    Layer,
    file_digest,
    write_layer,
)

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
# Bump when the layout of a layer changes, so cached layers are not reused across it.
LAYER_FORMAT = "1"


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- the blob store --------------------------------------------------------------------------


class BlobStore:
    """Content-addressed blobs (``sha256/<hex>``) plus a key -> layer index.

    Every write goes to a temporary file first and is renamed into place, so a killed
    build never leaves a blob whose content doesn't match its name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.keys = root / "layers"
        self.tmp = root / "tmp"
        for path in (self.blobs, self.keys, self.tmp):
            path.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def content_size(self, digest: str) -> int:
        """The bytes of the regular files in a layer blob (plain or gzip tar): what an
        engine counts as the layer's size, and ``docker images`` sums. Read once per
        blob, then remembered next to it."""
        remembered = self.root / "sizes" / digest.removeprefix("sha256:")
        try:
            return int(remembered.read_text())
        except (OSError, ValueError):
            pass
        with tarfile.open(self.path(digest), "r:*") as layer:
            size = sum(member.size for member in layer if member.isreg())
        remembered.parent.mkdir(exist_ok=True)
        tmp = self.tmp / f"size.{digest[7:]}.{os.getpid()}"
        tmp.write_text(str(size))
        tmp.replace(remembered)
        return size

    def put_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            tmp = self.tmp / f"{digest[7:]}.{os.getpid()}"
            tmp.write_bytes(data)
            tmp.replace(self.path(digest))
        return digest

    def put_file(self, source: Path, digest: str | None = None) -> str:
        """Add ``source`` (moved when it is in our tmp, copied otherwise)."""
        digest = digest or file_digest(source)
        if self.has(digest):
            return digest
        if source.parent == self.tmp:
            source.replace(self.path(digest))
        else:
            tmp = self.tmp / f"{digest[7:]}.{os.getpid()}"
            shutil.copyfile(source, tmp)
            tmp.replace(self.path(digest))
        return digest

    def cached_layer(self, key: str) -> Layer | None:
        record = self.keys / f"{key}.json"
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if not self.has(data["digest"]) or self.path(data["digest"]).stat().st_size != data["size"]:
            return None
        return Layer(
            digest=data["digest"],
            size=data["size"],
            path=self.path(data["digest"]),
            comment=data["comment"],
        )

    def layer(self, key: str, comment: str, entries: Iterable[Entry], epoch: int) -> Layer:
        """Write the layer for ``key`` and index it."""
        tmp = self.tmp / f"layer-{key}.{os.getpid()}"
        written = write_layer(entries, tmp, epoch=epoch, comment=comment)
        self.put_file(tmp, written.digest)
        record = self.keys / f"{key}.json"
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(
            json.dumps({"digest": written.digest, "size": written.size, "comment": comment})
        )
        partial.replace(record)
        return Layer(
            digest=written.digest,
            size=written.size,
            path=self.path(written.digest),
            comment=comment,
        )
