"""The daemonless OCI backend: the image written byte by byte, the same on any machine.

Inputs are the :class:`~packager.stage.BuildPlan` the Docker backend renders its
Dockerfile from, the lock and wheelhouse, a base image, and an epoch taken from the
inputs (the model version's creation time). Output is an OCI image: the base image's
layers reused by digest, then deterministic layers (see :mod:`packager.image.layers`)::

    /opt/venv              the locked wheels, installed by wheelinstall (as the Docker
                           backend's build does, so the trees are the same)
    /opt/packager/server   the scoring server
    /opt/model (code/)     the model's code
    /opt/model (artifacts) its artifacts; each file over 32 MiB in a layer of its own
    /opt/model             MLmodel, env files, weights, examples

and a config with the Docker backend's user, entrypoint, environment, labels, ports and
health check. Two fixed times, neither from the clock: the config's ``created`` and the
history carry the epoch (the model version's creation time), and every file in every layer
carries :data:`FILE_EPOCH`, the same for all models and versions. File times carry no
information, and a fixed one lets an unchanged layer (the venv, a large artifact) be the
same blob for every version. Layers are cached by a key of what went into them, so a warm
rebuild writes no layer and a new model version writes only what changed.

Bases come from the local engine (``docker save``, cached by image id), an OCI layout
directory (``oci:DIR[:TAG]``) or a docker-archive file (``docker-archive:FILE``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import packager
from packager.errors import ImageBuildError, UsageError
from packager.image import engine, rootfs, wheelinstall
from packager.image.base import DEFAULT_EPOCH
from packager.image.layers import (
    LAYER_MEDIA_TYPE,
    Entry,
    Layer,
    entries_from_tree,
    file_digest,
    write_layer,
)
from packager.stage import (
    ENTRYPOINT,
    HEALTHCHECK,
    MODEL_DIR,
    PORT,
    SERVER_DIR,
    USER_ID,
    VENV,
    BuildPlan,
)

log = logging.getLogger(__name__)

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
LARGE_FILE = 32 * 2**20
# The mtime of every file packager writes into a layer: the release of this layer recipe
# (the same as the mmdebstrap base's SOURCE_DATE_EPOCH).
FILE_EPOCH = DEFAULT_EPOCH
# Bump when the layout of a layer changes, so cached layers are not reused across it.
LAYER_FORMAT = "1"
_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_PLATFORMS = {"linux/amd64": ("amd64", None), "linux/arm64": ("arm64", "v8")}


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


# -- base images -----------------------------------------------------------------------------


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
    distribution API; ``platform`` picks the image from a multi-platform index).
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


# -- assembling ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """Everything the image is made of, besides the plan's files."""

    plan: BuildPlan
    lock_text: str
    manifest: bytes  # wheelhouse.txt
    wheels: tuple[Path, ...]
    python: str
    platform: str
    epoch: int


@dataclass(frozen=True, kw_only=True)
class OciImage:
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layers: tuple[tuple[str, str, int], ...]  # (media type, digest, size), base first
    written: int  # how many layers were written (not reused from the cache)
    store: BlobStore


def check_platform(base: Base, platform: str) -> None:
    """Refuse a base built for another platform than the image's."""
    architecture, _ = _PLATFORMS[platform]
    if base.config.get("architecture", architecture) != architecture:
        theirs = f"{base.config.get('os', 'linux')}/{base.config.get('architecture')}"
        raise UsageError(
            f"the base image {base.reference} is for {theirs}, the image is for {platform}",
            hint=f"pass --platform {theirs}, or a base image built for {platform}",
        )


def assemble(inputs: Inputs, base: Base, store: BlobStore) -> OciImage:
    architecture, variant = _PLATFORMS[inputs.platform]
    check_platform(base, inputs.platform)
    if inputs.plan.system_packages:
        raise UsageError(
            "--system-package needs apt inside the image, which only the Docker backend runs",
            hint="use --backend docker, or a base image that already has the packages",
        )
    interpreter = base_python(base, inputs.python)
    maker = _LayerMaker(store, FILE_EPOCH)
    layers = [_dependency_layer(inputs, base, interpreter, maker, store)]
    for kind, comment, entries in _plan_groups(inputs.plan):
        # "private" only when set, so every other layer keeps the key it had.
        material = [
            [e.path, e.executable, _entry_digest(e), *(["private"] if e.private else [])]
            for e in entries
        ]
        layers.append(maker.cached(kind, material) or maker.make(kind, comment, material, entries))
    config = _config(inputs, base, layers, architecture, variant)
    config_bytes = canonical_json(config)
    config_digest = store.put_bytes(config_bytes)
    descriptors = [(b.media_type, b.digest, b.size) for b in base.layers]
    descriptors += [(LAYER_MEDIA_TYPE, layer_.digest, layer_.size) for layer_ in layers]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": _oci_media(media), "digest": digest, "size": size}
            for media, digest, size in descriptors
        ],
    }
    manifest_bytes = canonical_json(manifest)
    manifest_digest = store.put_bytes(manifest_bytes)
    return OciImage(
        manifest=manifest_bytes,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layers=tuple(descriptors),
        written=maker.written,
        store=store,
    )


class _LayerMaker:
    """Layers keyed by what went into them: reused from the store, or written and counted."""

    def __init__(self, store: BlobStore, epoch: int) -> None:
        self.store = store
        self.epoch = epoch
        self.written = 0

    def key(self, kind: str, material: object) -> str:
        return hashlib.sha256(
            canonical_json([LAYER_FORMAT, kind, self.epoch, material])
        ).hexdigest()

    def cached(self, kind: str, material: object) -> Layer | None:
        return self.store.cached_layer(self.key(kind, material))

    def make(self, kind: str, comment: str, material: object, entries: list[Entry]) -> Layer:
        self.written += 1
        return self.store.layer(self.key(kind, material), comment, entries, self.epoch)


def _oci_media(media: str) -> str:
    if media.startswith(_DOCKER_LAYER):
        return LAYER_MEDIA_TYPE + ("+gzip" if media.endswith("gzip") else "")
    return media


def _dependency_layer(
    inputs: Inputs, base: Base, interpreter: str, maker: _LayerMaker, store: BlobStore
) -> Layer:
    """/opt/venv, installed by wheelinstall into a staging tree that lives as long as needed."""
    material = [
        hashlib.sha256(inputs.lock_text.encode()).hexdigest(),
        hashlib.sha256(inputs.manifest).hexdigest(),
        inputs.python,
        interpreter,
        _installer_version(),
        file_digest(Path(wheelinstall.__file__)),
        # Bytecode depends on the exact interpreter: the base's layers identify it.
        [layer.diff_id for layer in base.layers] if inputs.plan.bytecode else "no bytecode",
        "tests kept" if inputs.plan.keep_tests else "tests pruned",
    ]
    comment = f"{VENV}: the locked wheelhouse"
    cached = maker.cached("dependencies", material)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="packager-venv-", dir=store.tmp) as tmp:
        staging = Path(tmp)
        wheels = staging / "wheels"
        wheels.mkdir()
        for wheel in inputs.wheels:
            try:
                os.link(wheel, wheels / wheel.name)
            except OSError:
                shutil.copyfile(wheel, wheels / wheel.name)
        (staging / "requirements.lock").write_text(inputs.lock_text)
        (staging / "wheelhouse.txt").write_bytes(inputs.manifest)
        root = staging / "root"
        try:
            wheelinstall.install(
                wheels=wheels,
                manifest=staging / "wheelhouse.txt",
                lock=staging / "requirements.lock",
                venv=VENV,
                python=inputs.python,
                base_python=interpreter,
                root=root,
            )
        except wheelinstall.InstallError as err:
            raise ImageBuildError(f"installing the wheelhouse failed: {err}") from err
        if not inputs.plan.keep_tests:
            removed, freed = wheelinstall.prune_tests(
                wheelinstall.site_packages(root / VENV.lstrip("/"), inputs.python)
            )
            log.info("removed %d tests directories (%.1f MiB)", removed, freed / 2**20)
        if inputs.plan.bytecode:
            _write_bytecode(root, inputs.python, interpreter, base, store)
        entries = entries_from_tree(root / VENV.lstrip("/"), VENV)
        return maker.make("dependencies", comment, material, entries)


def _write_bytecode(
    root: Path, python: str, interpreter: str, base: Base, store: BlobStore
) -> None:
    """Compile the staged venv with the base's own interpreter, run from the base's root
    file system (see :mod:`packager.image.rootfs`), as the Docker backend does in its
    build. The pycs name their final paths (/opt/venv/…): the staging directory is
    stripped from every file name."""
    system = rootfs.base_rootfs(base, store)
    command = rootfs.interpreter_command(system, interpreter, what="writing bytecode")
    work = Path(tempfile.mkdtemp(prefix="venv-", dir=store.tmp))
    staged = root / VENV.lstrip("/")
    moved = work / VENV.lstrip("/")
    try:
        shutil.copyfile(wheelinstall.__file__, work / "wheelinstall.py")
        moved.parent.mkdir(parents=True)
        staged.rename(moved)  # same file system: the store holds both
        try:
            site = wheelinstall.site_packages(moved, python)
            wheelinstall.compile_in_parallel(
                sorted(site.iterdir()),
                [*command, str(work / "wheelinstall.py")],
                jobs=len(os.sched_getaffinity(0)),
                strip=str(work),
                prepend="/",
                env=rootfs.interpreter_environment(system, interpreter),
            )
        except wheelinstall.InstallError as err:
            raise ImageBuildError(str(err), hint="build with --no-bytecode") from err
        finally:
            moved.rename(staged)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _installer_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("installer")


def _plan_groups(plan: BuildPlan) -> list[tuple[str, str, list[Entry]]]:
    """The plan's files as layer entries: server, code, artifacts (large ones alone), model."""
    targets = {
        "server/": SERVER_DIR,
        "model-code/": MODEL_DIR,
        "model-artifacts/": MODEL_DIR,
        "model/": MODEL_DIR,
    }
    groups: dict[str, list[Entry]] = {prefix: [] for prefix in targets}
    large: list[Entry] = []
    for item in plan.files:
        prefix = next((p for p in targets if item.destination.startswith(p)), None)
        if prefix is None:
            continue  # the lock, wheels and tools: consumed by the dependency layer
        path = f"{targets[prefix]}/{item.destination.removeprefix(prefix)}"
        executable = bool(item.source is not None and item.source.stat().st_mode & 0o111)
        entry = Entry(
            path=path,
            source=item.source,
            content=item.content,
            executable=executable,
            private=item.private,
        )
        if prefix == "model-artifacts/" and item.source and item.source.stat().st_size > LARGE_FILE:
            large.append(entry)
        else:
            groups[prefix].append(entry)
    # COPY creates its destination even when the source folder is empty.
    for prefix in ("model-code/", "model-artifacts/"):
        groups[prefix].append(Entry(path=MODEL_DIR, directory=True))
    result = [
        ("server", f"{SERVER_DIR}: packager_server", groups["server/"]),
        ("code", f"{MODEL_DIR}: the model's code", groups["model-code/"]),
        ("artifacts", f"{MODEL_DIR}: the model's artifacts", groups["model-artifacts/"]),
    ]
    result += [
        ("large", f"{entry.path} (large file)", [entry])
        for entry in sorted(large, key=lambda e: e.path)
    ]
    result.append(("model", f"{MODEL_DIR}: MLmodel, environment and weights", groups["model/"]))
    return result


def _entry_digest(entry: Entry) -> str:
    if entry.content is not None:
        return "sha256:" + hashlib.sha256(entry.content).hexdigest()
    if entry.source is not None:
        return file_digest(entry.source)
    return entry.symlink or ("dir" if entry.directory else "")


def _config(
    inputs: Inputs, base: Base, layers: list[Layer], architecture: str, variant: str | None
) -> dict[str, Any]:
    created = iso_time(inputs.epoch)
    base_config = base.config.get("config") or {}
    env = list(base_config.get("Env") or [])
    for key, value in inputs.plan.environment:  # ENV replaces a key in place, as Docker does
        entry = f"{key}={value}"
        position = next((i for i, e in enumerate(env) if e.split("=", 1)[0] == key), None)
        if position is None:
            env.append(entry)
        else:
            env[position] = entry
    labels = dict(base_config.get("Labels") or {})
    labels.update(dict(inputs.plan.labels))
    container: dict[str, Any] = {
        "Entrypoint": list(ENTRYPOINT),
        "Env": env,
        "ExposedPorts": {f"{PORT}/tcp": {}},
        "Healthcheck": {
            "Test": ["CMD", *HEALTHCHECK],
            "Interval": 10 * 10**9,
            "Timeout": 3 * 10**9,
            "StartPeriod": 120 * 10**9,
            "Retries": 3,
        },
        "Labels": labels,
        "User": f"{USER_ID}:{USER_ID}",
        "WorkingDir": MODEL_DIR,
    }
    history = list(base.config.get("history") or [])
    by = f"packager {packager.__version__} (oci backend)"
    history += [
        {"created": created, "created_by": f"{by}: {layer.comment}", "comment": layer.comment}
        for layer in layers
    ]
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "author": by,
        "config": container,
        "rootfs": {
            "type": "layers",
            "diff_ids": [b.diff_id for b in base.layers] + [layer.digest for layer in layers],
        },
        "history": history,
    }
    if variant:
        config["variant"] = variant
    return config


def iso_time(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- outputs ---------------------------------------------------------------------------------


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
