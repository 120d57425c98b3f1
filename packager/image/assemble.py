"""The daemonless OCI backend: the image written byte by byte, the same on any machine.

Inputs are the :class:`~packager.stage.BuildPlan` the Docker backend renders its
Dockerfile from, the lock and wheelhouse, a base image, and an epoch taken from the
inputs (the model version's creation time). Output is an OCI image: the base image's
layers reused by digest, then deterministic layers (see :mod:`packager.image.layers`)::

    /opt/conda             the lock's conda packages, when it has any (one layer, made by
                           packager.image.condalayer, the same blob the Docker backend ADDs)
    /opt/venv              the locked wheels, installed by wheelinstall (as the Docker
                           backend's build does, so the trees are the same)
    /opt/packager/server   the scoring server
    /opt/model (code/)     the model's code
    /opt/model (artifacts) its artifacts; each file over 32 MiB in a layer of its own
    /opt/model/<dir>       one layer per directory a flavor loads whole (transformers'
                           weights, its tokenizer): see spec.model.Flavor.layer_dirs
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
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import packager
from packager.errors import ImageBuildError, UsageError
from packager.image import rootfs, wheelinstall
from packager.image.base import DEFAULT_EPOCH
from packager.image.bases import DOCKER_LAYER, PLATFORMS, Base, base_python, check_platform
from packager.image.blobs import (
    CONFIG_MEDIA_TYPE,
    LAYER_FORMAT,
    MANIFEST_MEDIA_TYPE,
    BlobStore,
    canonical_json,
)
from packager.image.layers import (
    LAYER_MEDIA_TYPE,
    Entry,
    Layer,
    entries_from_tree,
    file_digest,
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

LARGE_FILE = 32 * 2**20
# The mtime of every file packager writes into a layer: the release of this layer recipe
# (the same as the mmdebstrap base's SOURCE_DATE_EPOCH).
FILE_EPOCH = DEFAULT_EPOCH


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


def assemble(inputs: Inputs, base: Base, store: BlobStore) -> OciImage:
    architecture, variant = PLATFORMS[inputs.platform]
    check_platform(base, inputs.platform)
    if inputs.plan.system_packages:
        raise UsageError(
            "--system-package needs apt inside the image, which only the Docker backend runs",
            hint="use --backend docker, or a base image that already has the packages",
        )
    interpreter = base_python(base, inputs.python)
    maker = _LayerMaker(store, FILE_EPOCH)
    layers = [] if inputs.plan.conda is None else [inputs.plan.conda.layer]
    layers.append(_dependency_layer(inputs, base, interpreter, maker, store))
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
    if media.startswith(DOCKER_LAYER):
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
    venv_python = inputs.plan.venv_python
    if venv_python is not None:  # appended: a venv on the base's Python keeps its key
        material.append(["venv on", venv_python, "system site-packages"])
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
                base_python=venv_python or interpreter,
                root=root,
                system_site_packages=venv_python is not None,
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
    own: dict[str, list[Entry]] = {}  # a flavor's weights or component directory: its layer
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
        elif prefix == "model/" and item.layer is not None:
            own.setdefault(item.layer, []).append(entry)
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
    result += [
        ("directory", f"{MODEL_DIR}/{directory}: the flavor's {directory}", own[directory])
        for directory in sorted(own)
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
