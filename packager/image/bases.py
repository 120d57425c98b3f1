"""Base images for the OCI backend, from wherever they are: the local engine (``docker
save``, cached by image id), an OCI layout (``oci:DIR[:TAG]``), a docker-archive
(``docker-archive:FILE``) or a registry (``docker://…``, pulled by the distribution API).
Each gives a :class:`Base`: its config, its layers' blobs in the store, its file list."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from packager.errors import ImageBuildError, UsageError
from packager.image import engine
from packager.image.blobs import BlobStore
from packager.image.layers import (
    LAYER_MEDIA_TYPE,
    file_digest,
)

log = logging.getLogger(__name__)

# Docker Hub's registry, where names without a registry live, and the setting that points
# them at a mirror (a pull-through cache, an internal registry) instead.
DOCKER_HUB = "registry-1.docker.io"
BASE_REGISTRY_ENV = "PACKAGER_BASE_REGISTRY"

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
PLATFORMS = {"linux/amd64": ("amd64", None), "linux/arm64": ("arm64", "v8")}


@dataclass(frozen=True, kw_only=True)
class BaseLayer:
    media_type: str
    digest: str
    size: int
    diff_id: str


@dataclass(frozen=True, kw_only=True)
class Base:
    reference: str
    config: dict[str, Any]
    layers: tuple[BaseLayer, ...]
    files: frozenset[str]  # every path in the base's layers (for finding its Python)
    digest: str  # what pins it: registry digest, else image id / manifest digest


def load_base(
    reference: str,
    store: BlobStore,
    *,
    client_factory: Callable[[], Any],
    platform: str = "linux/amd64",
) -> Base:
    """The base image's config and layers, with every layer blob in ``store``.

    ``reference`` is an image in the local engine, ``oci:DIR[:TAG]``,
    ``docker-archive:FILE``, or ``docker://REGISTRY/NAME[:TAG|@DIGEST]`` (pulled with the
    distribution API; ``platform`` picks the image from a multi-platform index). A plain
    reference the engine lacks (or with no engine) is pulled from its registry.
    """
    if reference.startswith("oci:"):
        return _base_from_layout(reference, store)
    if reference.startswith("docker://"):
        from packager.errors import PushError  # noqa: PLC0415

        try:
            return _base_from_registry(reference, store, platform)
        except PushError as err:  # the registry client speaks of pushes; this is a pull
            raise ImageBuildError(
                f"pulling the base {reference} failed: {err.message}",
                hint="check the address (docker://REGISTRY/NAME:TAG) and the credentials",
            ) from err
    if reference.startswith("docker-archive:"):
        path = Path(reference.removeprefix("docker-archive:"))
        if not path.is_file():
            raise UsageError(f"the base archive {path} does not exist")
        return _base_from_archive(reference, path, store)
    quick = engine.inspect_image_quickly(reference)
    if quick is not None:
        known = _saved_base(reference, store, str(quick["Id"]), engine.digest_from_attrs(quick))
        if known is not None:
            return known
        return _base_from_engine(reference, store, client_factory())
    client = _engine_with(reference, client_factory)
    if client is not None:
        return _base_from_engine(reference, store, client)
    # Not in an engine (or none answers): from its registry, by digest, as `docker pull`
    # would, but with no daemon. Docker Hub names go to PACKAGER_BASE_REGISTRY if set.
    pulled = registry_reference(reference)
    log.info("the base %s is not in a local engine: pulling docker://%s", reference, pulled)
    return load_base(f"docker://{pulled}", store, client_factory=client_factory, platform=platform)


def registry_reference(reference: str) -> str:
    """Where a plain image reference lives: ``REGISTRY/REPO:TAG`` as Docker resolves it
    (``python:3.11-slim`` is Docker Hub's ``library/python``), with Docker Hub replaced by
    the mirror in ``PACKAGER_BASE_REGISTRY`` (``HOST[:PORT]``) when that is set."""
    first, _, rest = reference.partition("/")
    if first in ("docker.io", "index.docker.io", DOCKER_HUB):
        reference, (first, _, rest) = rest, rest.partition("/")
    elif rest and ("." in first or ":" in first or first == "localhost"):
        return reference  # names its registry: no mirror applies
    path = reference if rest else f"library/{reference}"
    mirror = os.environ.get(BASE_REGISTRY_ENV, "").strip().rstrip("/")
    return f"{mirror or DOCKER_HUB}/{path}"


def _engine_with(reference: str, client_factory: Callable[[], Any]) -> Any | None:
    """A client of an engine that has ``reference``, or None (no engine, or it lacks it)."""
    from packager.errors import DockerUnavailableError  # noqa: PLC0415

    if not engine.reachable():
        return None
    try:
        client = client_factory()
    except DockerUnavailableError:
        return None
    return client if engine.image_exists(client, reference) else None


def _saved_base(reference: str, store: BlobStore, image_id: str, digest: str) -> Base | None:
    """The base read from the engine before, if every layer blob is still in the store."""
    saved = store.root / "bases" / f"{image_id.removeprefix('sha256:')}.json"
    try:
        record = json.loads(saved.read_text())
    except (OSError, ValueError):
        return None
    layers = tuple(BaseLayer(**layer) for layer in record["layers"])
    if not all(store.has(layer.digest) for layer in layers):
        return None
    return Base(
        reference=reference,
        config=record["config"],
        layers=layers,
        files=frozenset(record["files"]),
        digest=digest,
    )


def _base_from_engine(reference: str, store: BlobStore, client: Any) -> Base:
    from docker.errors import ImageNotFound  # noqa: PLC0415

    try:
        image = client.images.get(reference)
    except ImageNotFound as err:
        raise ImageBuildError(
            f"the base image {reference} is not in the local engine",
            hint="pull it, pass an OCI layout (oci:DIR) or docker-archive:FILE, or build "
            "one with `packager base build --python X.Y -t TAG`",
        ) from err
    image_id = str(image.id)
    known = _saved_base(reference, store, image_id, engine.image_digest(image))
    if known is not None:
        return known
    saved = store.root / "bases" / f"{image_id.removeprefix('sha256:')}.json"
    log.info("reading the base image %s from the engine (once per image id)", reference)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=store.tmp, suffix=".tar") as archive:
        for chunk in image.save(named=False):
            archive.write(chunk)
        archive.flush()
        base = replace(
            _base_from_archive(reference, Path(archive.name), store),
            digest=engine.image_digest(image),
        )
    partial = saved.with_name(f".{saved.name}.{os.getpid()}")
    partial.write_text(
        json.dumps(
            {
                "config": base.config,
                "layers": [layer.__dict__ for layer in base.layers],
                "files": sorted(base.files),
            }
        )
    )
    partial.replace(saved)
    return base


def _base_from_archive(reference: str, path: Path, store: BlobStore) -> Base:
    with tarfile.open(path) as archive:
        try:
            manifest = json.loads(_read_member(archive, "manifest.json"))[0]
        except (KeyError, ValueError, IndexError) as err:
            raise UsageError(f"{path} is not a docker-archive (no usable manifest.json)") from err
        config_bytes = _read_member(archive, manifest["Config"])
        config = json.loads(config_bytes)
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(manifest["Layers"]):
            raise UsageError(f"{path}: the config's diff_ids do not match its layers")
        layers = []
        files: set[str] = set()
        for name, diff_id in zip(manifest["Layers"], diff_ids, strict=True):
            member = archive.extractfile(name)
            if member is None:
                raise UsageError(f"{path}: layer {name} is missing")
            tmp = store.tmp / f"base-layer.{os.getpid()}"
            with tmp.open("wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
            digest = file_digest(tmp)
            files |= _layer_paths(tmp)
            media = LAYER_MEDIA_TYPE if digest == diff_id else LAYER_MEDIA_TYPE + "+gzip"
            size = tmp.stat().st_size
            store.put_file(tmp, digest)
            tmp.unlink(missing_ok=True)
            layers.append(BaseLayer(media_type=media, digest=digest, size=size, diff_id=diff_id))
    return Base(
        reference=reference,
        config=config,
        layers=tuple(layers),
        files=frozenset(files),
        digest="sha256:" + hashlib.sha256(config_bytes).hexdigest(),
    )


def _base_from_layout(reference: str, store: BlobStore) -> Base:
    spec = reference.removeprefix("oci:")
    directory, _, tag = spec.partition(":") if not Path(spec).is_dir() else (spec, "", "")
    root = Path(directory)
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{root} is not an OCI image layout (no readable index.json)") from err
    wanted = [
        m
        for m in index.get("manifests", [])
        if not tag or m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if not wanted:
        raise UsageError(f"{root} has no image{f' tagged {tag}' if tag else ''}")

    def blob(digest: str) -> Path:
        return root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    manifest = json.loads(blob(wanted[0]["digest"]).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())

    def copy(digest: str) -> None:
        if file_digest(blob(digest)) != digest:
            raise UsageError(f"{root}: blob {digest} does not match its digest")
        store.put_file(blob(digest), digest)

    return _base_from_manifest(
        reference, manifest, config, store, fetch=copy, digest=str(wanted[0]["digest"])
    )


def _base_from_registry(reference: str, store: BlobStore, platform: str) -> Base:
    from packager.image import registry  # noqa: PLC0415

    name = reference.removeprefix("docker://")
    pinned = ""
    if "@" in name:
        name, _, pinned = name.partition("@")
    target = registry.parse_target(name)
    client = registry.Client(target)
    body, media = client.get_manifest(pinned or target.tag)
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if pinned and manifest_digest != pinned:
        raise UsageError(f"the registry's manifest for {reference} is {manifest_digest}")
    manifest = json.loads(body)
    if media.endswith(("index.v1+json", "list.v2+json")) or "manifests" in manifest:
        os_name, _, arch = platform.partition("/")
        chosen = next(
            (
                m
                for m in manifest.get("manifests", [])
                if m.get("platform", {}).get("os") == os_name
                and m.get("platform", {}).get("architecture") == arch
            ),
            None,
        )
        if chosen is None:
            raise UsageError(f"{reference} has no image for {platform}")
        body, media = client.get_manifest(chosen["digest"])
        manifest_digest = chosen["digest"]
        manifest = json.loads(body)
    config_path = store.tmp / f"config.{os.getpid()}"
    client.fetch_blob(manifest["config"]["digest"], config_path)
    config = json.loads(config_path.read_bytes())
    config_path.unlink()

    def pull(digest: str) -> None:
        if not store.has(digest):
            tmp = store.tmp / f"pull.{os.getpid()}"
            client.fetch_blob(digest, tmp)
            store.put_file(tmp, digest)

    return _base_from_manifest(
        reference, manifest, config, store, fetch=pull, digest=manifest_digest
    )


def _base_from_manifest(
    reference: str,
    manifest: dict[str, Any],
    config: dict[str, Any],
    store: BlobStore,
    *,
    fetch: Callable[[str], None],
    digest: str,
) -> Base:
    """The base an image manifest describes; ``fetch`` puts a layer blob in the store."""
    layers = []
    files: set[str] = set()
    for descriptor, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        fetch(descriptor["digest"])
        files |= _layer_paths(store.path(descriptor["digest"]))
        layers.append(
            BaseLayer(
                media_type=descriptor["mediaType"],
                digest=descriptor["digest"],
                size=int(descriptor["size"]),
                diff_id=diff_id,
            )
        )
    return Base(
        reference=reference,
        config=config,
        layers=tuple(layers),
        files=frozenset(files),
        digest=digest,
    )


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    if member is None:
        raise KeyError(name)
    return member.read()


def _layer_paths(path: Path) -> set[str]:
    with tarfile.open(path) as layer:  # transparent gzip
        return {"/" + member.name.removeprefix("./").lstrip("/") for member in layer.getmembers()}


def base_python(base: Base, python: str) -> str:
    """The base's ``pythonX.Y`` as ``which`` inside it would find it on its PATH."""
    env = dict(e.split("=", 1) for e in base.config.get("config", {}).get("Env") or [] if "=" in e)
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for folder in path.split(":"):
        candidate = f"{folder.rstrip('/')}/python{python}"
        if candidate in base.files:
            return candidate
    raise UsageError(
        f"the base image {base.reference} has no python{python} on its PATH",
        hint=f"use a base with Python {python} (packager base build --python {python} -t TAG)",
    )


def check_platform(base: Base, platform: str) -> None:
    """Refuse a base built for another platform than the image's."""
    architecture, _ = PLATFORMS[platform]
    if base.config.get("architecture", architecture) != architecture:
        theirs = f"{base.config.get('os', 'linux')}/{base.config.get('architecture')}"
        raise UsageError(
            f"the base image {base.reference} is for {theirs}, the image is for {platform}",
            hint=f"pass --platform {theirs}, or a base image built for {platform}",
        )
