"""Where an OCI image goes: an OCI layout directory, a docker-archive for ``docker load``
(without the layers the engine already holds), and the first difference between two
builds that should have been the same."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from packager.errors import UsageError
from packager.image.assemble import OciImage
from packager.image.blobs import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, BlobStore, canonical_json

log = logging.getLogger(__name__)


def write_layout(image: OciImage, directory: Path, *, tag: str | None) -> None:
    """An OCI image layout at ``directory``, replaced atomically (built beside it, renamed)."""
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        blobs = staging / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for digest in _all_blobs(image):
            source = image.store.path(digest)
            target = blobs / digest.removeprefix("sha256:")
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        (staging / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        (staging / "index.json").write_bytes(canonical_json(_index(image, tag)))
        old = None
        if directory.exists():
            _refuse_unless_layout(directory)
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
        staging.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_unless_layout(directory: Path) -> None:
    if not (directory / "oci-layout").is_file() and any(directory.iterdir()):
        raise UsageError(
            f"{directory} exists and is not an OCI image layout; not replacing it",
            hint="choose an empty or new directory for -o",
        )


def _index(image: OciImage, tag: str | None) -> dict[str, Any]:
    descriptor: dict[str, Any] = {
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
    }
    if tag:
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [descriptor]}


def diff_ids(image: OciImage) -> list[str]:
    """The config's ``rootfs.diff_ids``: one per layer, in the order of ``image.layers``."""
    config = json.loads(image.store.path(image.config_digest).read_bytes())
    return [str(d) for d in config["rootfs"]["diff_ids"]]


def _all_blobs(image: OciImage) -> list[str]:
    """Every blob once (two layers can be the same, e.g. a model without code or artifacts)."""
    digests = [image.manifest_digest, image.config_digest, *(d for _, d, _ in image.layers)]
    return list(dict.fromkeys(digests))


def write_docker_archive(
    image: OciImage,
    destination: Path,
    *,
    tag: str | None,
    epoch: int,
    omit_layers: frozenset[str] = frozenset(),
) -> None:
    """A tar that ``docker load`` reads and that is also an OCI layout.

    ``omit_layers``: layer digests left out of the tar (the manifest still names them),
    for an engine that already has them: ``docker load`` looks a layer up by its chain of
    diff ids and reads the file only when the layer is missing. Such a tar is for that
    engine only: it is not a complete OCI layout.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)  # as write_layout's -o does
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    manifest = [
        {
            "Config": f"blobs/sha256/{image.config_digest.removeprefix('sha256:')}",
            "RepoTags": [tag] if tag else [],
            "Layers": [f"blobs/sha256/{d.removeprefix('sha256:')}" for _, d, _ in image.layers],
        }
    ]
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
            members: list[tuple[str, Path | bytes]] = [
                ("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
                ("index.json", canonical_json(_index(image, tag))),
                ("manifest.json", canonical_json(manifest)),
            ]
            members += [
                (f"blobs/sha256/{digest.removeprefix('sha256:')}", image.store.path(digest))
                for digest in _all_blobs(image)  # each blob once
                if digest not in omit_layers
            ]
            for name in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
                archive.addfile(info)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.mode, info.mtime = 0o644, epoch
                if isinstance(data, bytes):
                    info.size = len(data)
                    archive.addfile(info, _BytesReader(data))
                else:
                    info.size = data.stat().st_size
                    with data.open("rb") as stream:
                        archive.addfile(info, stream)
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk = bytes(self.data[self.offset : end])
        self.offset += len(chunk)
        return chunk


def layer_members(path: Path) -> dict[str, tuple[str, int, str]]:
    """path -> (type, mode, sha256 or link target) for every entry of a layer tar."""
    found: dict[str, tuple[str, int, str]] = {}
    with tarfile.open(path) as layer:
        for member in layer:
            kind = member.type.decode()
            detail = member.linkname
            if member.isfile():
                stream = layer.extractfile(member)
                detail = hashlib.sha256(stream.read() if stream else b"").hexdigest()
            found[str(PurePosixPath("/", member.name))] = (kind, member.mode, detail)
    return found


def first_difference(first: BlobStore, second: BlobStore, digest_a: str, digest_b: str) -> str:
    """Where two builds differ: the config, or the first file of the first differing layer."""
    manifests = [
        json.loads(s.path(d).read_bytes()) for s, d in ((first, digest_a), (second, digest_b))
    ]
    configs = [
        json.loads(s.path(m["config"]["digest"]).read_bytes())
        for s, m in zip((first, second), manifests, strict=True)
    ]
    layers_a, layers_b = manifests[0]["layers"], manifests[1]["layers"]
    history = [h for h in configs[0].get("history", []) if not h.get("empty_layer")]
    for number, (a, b) in enumerate(zip(layers_a, layers_b, strict=False), 1):
        if a["digest"] == b["digest"]:
            continue
        what = history[number - 1].get("comment", "") if number <= len(history) else ""
        files_a = layer_members(first.path(a["digest"]))
        files_b = layer_members(second.path(b["digest"]))
        for path in sorted(set(files_a) | set(files_b)):
            if files_a.get(path) != files_b.get(path):
                return f"layer {number} ({what}): {path} differs"
        return f"layer {number} ({what}): same files, different tar bytes (order or metadata)"
    if len(layers_a) != len(layers_b):
        return f"the images have {len(layers_a)} and {len(layers_b)} layers"
    for key in sorted(set(configs[0]) | set(configs[1])):
        if configs[0].get(key) != configs[1].get(key):
            return f"the image config differs in {key!r}"
    return "the manifests differ"
