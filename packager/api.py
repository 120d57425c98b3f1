"""The library's front door: one function per CLI command, typed in and out.

The CLI only parses arguments into these calls and prints their results; anything a
pipeline can do with ``packager <command>`` it can do by importing this module.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from packager.cache import ModelCache, default_cache_root
from packager.env.conda import conda_part
from packager.env.condapkgs import CondaPackages, fetch_conda_packages
from packager.env.inputs import IndexOptions, LockInputs, build_inputs
from packager.env.resolve import LockResult, lock, make_resolver
from packager.env.target import Target
from packager.env.wheelhouse import Wheelhouse, build_wheelhouse
from packager.errors import ImageBuildError, UsageError
from packager.image import assemble, bases, blobs, condalayer, engine, export
from packager.image.base import validate_reference
from packager.image.registry import PushedBlobs, push_image
from packager.progress import Progress
from packager.reference import parse_reference
from packager.source import Provenance, RegistryOptions, SourcedModel, fetch_model
from packager.spec import LineKind, ModelSpec, read_spec
from packager.stage import (
    LOCK_DIGEST_LABEL,
    BuildPlan,
    plan_context,
    wheelhouse_manifest,
    write_context,
)
from packager.verify import TestReport, verify_image

log = logging.getLogger(__name__)
_MAC_OR_WINDOWS_TAGS = ("macosx", "win32", "win_amd64", "win_arm64")


@dataclass(frozen=True, kw_only=True)
class Inspection:
    """What ``packager inspect`` reports."""

    provenance: Provenance
    spec: ModelSpec
    warnings: tuple[str, ...]


def inspect_model(
    reference: str,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> Inspection:
    """Resolve ``reference``, fetch it (or reuse the cache), and describe what it needs."""
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    spec = read_spec(sourced.path, sourced.files)
    return Inspection(provenance=sourced.provenance, spec=spec, warnings=_warnings(spec))


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int | None = None
    timeout: float | None = None
    max_payload: int | None = None
    log_format: str | None = None


@dataclass(frozen=True, kw_only=True)
class ServeCommand:
    """The server process to start (the CLI execs it)."""

    argv: tuple[str, ...]
    provenance: Provenance


# What packager_server imports besides MLflow: its HTTP server, and what MLflow's scoring
# reads requests into (mlflow-skinny, packager's own dependency, has neither).
_SERVER_MODULES = ("uvicorn", "numpy", "pandas")


def serve_command(
    reference: str,
    serve: ServeOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> ServeCommand:
    """Fetch the model and build the command line of ``packager_server`` for it.

    The server runs in the current Python environment, which must have the model's own
    requirements installed (``packager inspect`` lists them).
    """
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"packager serve runs the server in this Python environment, which lacks "
            f"{', '.join(missing)}",
            hint="pip install 'mlflow-packager[server]' (and the model's own requirements: "
            "packager inspect lists them)",
        )
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    read_spec(sourced.path, sourced.files)  # refuse unservable models before starting
    prov = sourced.provenance
    argv = [
        sys.executable,
        "-m",
        "packager_server",
        "--model-dir",
        str(sourced.path),
        "--host",
        serve.host,
        "--port",
        str(serve.port),
    ]
    for flag, value in (
        ("--workers", serve.workers),
        ("--timeout", serve.timeout),
        ("--max-payload", serve.max_payload),
        ("--log-format", serve.log_format),
        ("--model-name", prov.model_name),
        ("--model-version", prov.model_version),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return ServeCommand(argv=tuple(argv), provenance=prov)


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    input: Path
    output: Path
    content_type: str | None = None  # csv, json, jsonl, parquet; default: the suffix's
    workers: int | None = None
    chunk_rows: int | None = None


def predict_command(
    reference: str,
    predict: PredictOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> ServeCommand:
    """Fetch the model and build the command line of ``packager_server predict`` for it:
    the image's batch scoring (``docker run IMAGE predict``), run in this environment."""
    missing = [m for m in _SERVER_MODULES[1:] if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"packager predict scores in this Python environment, which lacks {', '.join(missing)}",
            hint="pip install 'mlflow-packager[server]' (and the model's own requirements: "
            "packager inspect lists them)",
        )
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    read_spec(sourced.path, sourced.files)  # refuse unservable models before loading
    prov = sourced.provenance
    argv = [sys.executable, "-m", "packager_server", "predict", "--model-dir", str(sourced.path)]
    argv += ["--input", str(predict.input), "--output", str(predict.output)]
    for flag, value in (
        ("--content-type", predict.content_type),
        ("--workers", predict.workers),
        ("--chunk-rows", predict.chunk_rows),
        ("--model-name", prov.model_name),
        ("--model-version", prov.model_version),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return ServeCommand(argv=tuple(argv), provenance=prov)


@dataclass(frozen=True, kw_only=True)
class LockOptions:
    resolver: str = "uv"
    python: str | None = None  # default: the model's
    platform: str = "linux/amd64"
    index: IndexOptions = field(default_factory=IndexOptions)
    lock_file: Path | None = None  # a lock the user keeps: verified, used as is
    download: bool = False  # also fill the wheelhouse
    mlflow_skinny: bool = False  # swap mlflow for mlflow-skinny where verified
    ignore_conda: bool = False  # lock the pip requirements of a model that needs conda
    conda_channels: tuple[str, ...] = ()  # replace conda.yaml's channels (may carry credentials)


@dataclass(frozen=True, kw_only=True)
class LockReport:
    provenance: Provenance
    spec: ModelSpec
    inputs: LockInputs
    result: LockResult
    wheelhouse: Wheelhouse | None
    conda_packages: CondaPackages | None = None  # with download, for a lock with a conda part


def lock_model(
    reference: str,
    lock_options: LockOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
    sourced: SourcedModel | None = None,
) -> LockReport:
    """Resolve the model's requirements (and the server's) into a hash-pinned lock.

    ``sourced`` is the model when the caller has already fetched ``reference``.
    """
    from packager_server import REQUIREMENTS  # noqa: PLC0415 - the server declares its needs

    if sourced is None:
        ref = parse_reference(reference, cwd=cwd or Path.cwd())
        sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    spec = read_spec(sourced.path, sourced.files)
    root = cache_root or default_cache_root()
    # Conda packages first: the Python they bring is the one the pip part is locked for.
    conda = None
    if spec.conda is not None and spec.conda.needs_conda and not lock_options.ignore_conda:
        conda = conda_part(
            spec.conda,
            lock_options.platform,
            channels=lock_options.conda_channels,
            python=lock_options.python,
            lock_file=lock_options.lock_file,
            cache_root=root,
        )
    python = lock_options.python or (conda.python if conda else None) or spec.python_version
    target = Target.make(python, lock_options.platform)
    inputs = build_inputs(
        spec, target, lock_options.index, REQUIREMENTS, mlflow_skinny=lock_options.mlflow_skinny
    )
    result = lock(
        inputs,
        make_resolver(lock_options.resolver),
        cache_root=root,
        lock_file=lock_options.lock_file,
    )
    if conda is not None:
        result = replace(result, lock=replace(result.lock, conda=conda))
    wheelhouse = (
        build_wheelhouse(result.lock, inputs, cache_root=root) if lock_options.download else None
    )
    conda_packages = (
        fetch_conda_packages(conda, channels=lock_options.conda_channels, cache_root=root)
        if conda is not None and lock_options.download
        else None
    )
    return LockReport(
        provenance=sourced.provenance,
        spec=spec,
        inputs=inputs,
        result=result,
        wheelhouse=wheelhouse,
        conda_packages=conda_packages,
    )


def _conda_part(report: LockReport, cache_root: Path | None) -> condalayer.CondaPart | None:
    """The lock's conda packages as the /opt/conda layer (both backends), if it has any."""
    conda = report.result.lock.conda
    if conda is None:
        return None
    if report.conda_packages is None:  # pragma: no cover - download=True always fetches them
        raise UsageError("internal: the conda packages were not fetched")
    store = blobs.BlobStore((cache_root or default_cache_root()) / "oci")
    return condalayer.conda_part(
        conda, report.conda_packages.files, store, epoch=assemble.FILE_EPOCH
    )


def _warnings(spec: ModelSpec) -> tuple[str, ...]:
    """Things that will need the user's attention when the image is built."""
    found = [
        f"requirements.txt:{line.line_no} names the wheel {line.path}, which is not inside "
        "the model; provide it with --wheel-dir when locking"
        for line in spec.missing_local_wheels
    ]
    found += [
        f"{line.file}:{line.line_no} uses the package index {line.url}; its credentials must "
        "come from the environment or netrc at lock time"
        for line in spec.requirements
        if line.kind in (LineKind.INDEX_URL, LineKind.EXTRA_INDEX_URL)
    ]
    if spec.wheels is not None:
        foreign = [
            w.path
            for w in spec.wheels.wheels
            if any(t.split("-")[-1].startswith(_MAC_OR_WINDOWS_TAGS) for t in w.tags)
        ]
        if foreign:
            found.append(
                f"{len(foreign)} wheel(s) in wheels/ were built for another platform "
                f"({spec.wheels.platform or 'unknown'}), e.g. {foreign[0]}; public packages "
                "will come from the index instead"
            )
    if spec.conda is not None and spec.conda.needs_conda:
        found.append(
            "conda.yaml needs conda packages ("
            + ", ".join(spec.conda.conda_packages[:5])
            + "); `packager lock` solves them with py-rattler for the image's platform"
        )
    if spec.needs_skops:
        found.append("the model is serialized with skops: `skops` must be installed to load it")
    if (
        spec.python_env is not None
        and spec.python_env.python
        and spec.python_env.python != spec.python_version
    ):
        found.append(
            f"python_env.yaml says Python {spec.python_env.python}, but "
            f"{spec.python_version_from} says {spec.python_version}; using the latter"
        )
    if spec.input_example is not None and not spec.input_example.present:
        found.append("MLmodel names an input example that is not in the model directory")
    return tuple(found)


# -- images -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    base_image: str | None = None  # default: python:X.Y-slim for the image's Python
    system_packages: tuple[str, ...] = ()
    lock: LockOptions = field(default_factory=LockOptions)
    # Ship the venv's bytecode, written by the base's interpreter: a faster start for a
    # larger image (see wheelinstall's docstring).
    bytecode: bool = True
    # Ship the packages' tests directories (by default they are removed: ~50 MB that a
    # served model never imports).
    keep_tests: bool = False

    def base_for(self, spec: ModelSpec) -> str:
        """The base image: the one given, or the official ``python:X.Y-slim`` for the
        Python the image will have (--python, else the model's)."""
        if self.base_image is not None:
            return self.base_image
        python = ".".join((self.lock.python or spec.python_version).split(".")[:2])
        return f"python:{python}-slim"


@dataclass(frozen=True, kw_only=True)
class GeneratedContext:
    directory: Path
    plan: BuildPlan
    lock: LockReport


@dataclass(frozen=True, kw_only=True)
class BuiltImage:
    image_id: str
    tags: tuple[str, ...]
    size_bytes: int  # the image's file contents, uncompressed, as the engine reports
    base_image: str
    base_image_id: str
    base_image_digest: str
    context: GeneratedContext


def generate_context(
    reference: str,
    directory: Path,
    image: ImageOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
    base_digest: str | None = None,
    sourced: SourcedModel | None = None,
) -> GeneratedContext:
    """Lock, download and write a self-contained build context for ``reference``."""
    lock_options = replace(image.lock, download=True)
    report = lock_model(
        reference,
        lock_options,
        options=options,
        cache=cache,
        cache_root=cache_root,
        progress=progress,
        cwd=cwd,
        sourced=sourced,
    )
    if report.wheelhouse is None:  # pragma: no cover - download=True always fills it
        raise UsageError("internal: no wheelhouse")
    base_image = image.base_for(report.spec)
    plan = plan_context(
        report.spec,
        report.provenance,
        report.result.lock,
        report.wheelhouse,
        base_image=base_image,
        base_digest=base_digest,
        system_packages=image.system_packages,
        bytecode=image.bytecode,
        keep_tests=image.keep_tests,
        conda=_conda_part(report, cache_root),
    )
    write_context(plan, directory)
    return GeneratedContext(directory=directory, plan=plan, lock=report)


def build_image(
    reference: str,
    tag: str,
    image: ImageOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    on_log: Callable[[str], None] | None = None,
    cwd: Path | None = None,
) -> BuiltImage:
    """Build ``reference`` into the image ``tag`` with the Docker engine."""
    validate_reference(tag)
    client = engine.connect()
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    spec = read_spec(sourced.path, sourced.files)
    base_image = image.base_for(spec)
    image = replace(image, base_image=base_image)
    base = _check_base(client, base_image, spec, image.lock.platform)
    with tempfile.TemporaryDirectory(prefix="packager-context-") as tmp:
        context = generate_context(
            reference,
            Path(tmp) / "context",
            image,
            options=options,
            cache=cache,
            cache_root=cache_root,
            progress=progress,
            cwd=cwd,
            base_digest=base.digest,
            sourced=sourced,
        )
        image_id = _build_with_retry(client, context.directory, on_log)
    engine.tag(client, image_id, tag)
    built = client.images.get(image_id)
    return BuiltImage(
        image_id=image_id,
        tags=(tag,),
        size_bytes=int(built.attrs["Size"]),
        base_image=base_image,
        base_image_id=base.image_id,
        base_image_digest=base.digest,
        context=context,
    )


# Storage-driver faults some engines (fuse-overlayfs) hit now and then while committing a
# layer; the same build succeeds when run again.
_TRANSIENT_BUILD_ERRORS = ("layer does not exist", "failed to export image")


def _build_with_retry(client: object, context: Path, on_log: Callable[[str], None] | None) -> str:
    for attempt in (1, 2):
        try:
            image_id = ""
            for line in engine.build(client, context):
                if line.startswith("id:"):
                    image_id = line[3:]
                elif on_log is not None:
                    on_log(line)
        except ImageBuildError as err:
            if attempt == 2 or not any(s in err.message for s in _TRANSIENT_BUILD_ERRORS):
                raise
            log.warning(
                "the engine failed while storing a layer (%s); building again", err.message[-200:]
            )
        else:
            return image_id
    raise AssertionError("unreachable")  # pragma: no cover


def _check_base(client: object, base: str, spec: ModelSpec, platform: str) -> engine.BaseInfo:
    """The base image's id and digest; refuses a base whose Python differs from the model's,
    or that is built for another platform than the image (the lock's wheels are for it)."""
    found = engine.base_python(client, base)
    if found.platform and found.platform != platform:
        raise UsageError(
            f"the base image {base} is for {found.platform}, the image is for {platform}",
            hint=f"pass --platform {found.platform}, or a base image built for {platform}",
        )
    if found.python is not None and found.python != spec.python_minor:
        raise UsageError(
            f"the base image {base} has Python {found.python}, the model needs {spec.python_minor}",
            hint=f"build one with `packager base build --python {spec.python_minor} -t TAG` "
            "or pass another --base-image",
        )
    return found


def verify_built_image(
    image: str,
    reference: str | None = None,
    *,
    payloads: tuple[Path, ...] = (),
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cwd: Path | None = None,
) -> TestReport:
    """Run ``image`` and check it answers as MLflow does for the model inside it. With
    ``reference``, also check the image was built from that model (its content digest)."""
    client = engine.connect()
    engine.image_labels(client, image)  # a missing image fails now, before any download
    digest = None
    if reference is not None:
        ref = parse_reference(reference, cwd=cwd or Path.cwd())
        digest = fetch_model(ref, options=options, cache=cache).provenance.content_digest
    return verify_image(image, payloads=payloads, model_digest=digest, client=client)


# -- the daemonless OCI backend -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OciOutputs:
    layout: Path | None = None  # write an OCI image layout here
    archive: Path | None = None  # write a docker-archive (also an OCI layout) here
    load: bool = False  # load into the local engine and tag
    push: bool = False  # push to the tag's registry with the distribution API


@dataclass(frozen=True, kw_only=True)
class OciBuilt:
    manifest_digest: str
    image_id: str  # the config digest: what the engine calls the image's id
    tag: str | None
    epoch: int
    layers: int
    layers_written: int  # the rest came from the layer cache
    # The image's file contents, uncompressed: the engine's (and `docker images`') size,
    # the same definition as the Docker backend's BuiltImage.size_bytes.
    size_bytes: int
    layers_bytes: int  # the layer blobs as stored (tar headers included): what a push sends
    base_image: str
    lock_digest: str
    layout: str | None
    archive: str | None
    loaded: bool
    layers_loaded: int | None  # --load: layers sent to the engine (it had the others)
    pushed: PushedBlobs | None


def epoch_for(provenance: Provenance, spec: ModelSpec) -> int:
    """The image's timestamp, from the inputs: the version's creation, else MLmodel's."""
    for text in (provenance.created_at, spec.utc_time_created):
        if text:
            try:
                parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                continue
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            return int(parsed.timestamp())
    return 0


def base_missing(reference: str) -> bool:
    """Whether an engine answers and lacks ``reference`` (False when there is no engine:
    a context may be built elsewhere)."""
    return engine.reachable() and engine.inspect_image_quickly(reference) is None


def engine_reachable() -> bool:
    """Whether a Docker engine answers (for ``build -t`` without an output: load into it)."""
    return engine.reachable()


def build_oci_image(
    reference: str,
    image: ImageOptions,
    outputs: OciOutputs,
    *,
    tag: str | None = None,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> OciBuilt:
    """Write the model's image with no Docker engine (the engine is only a base source)."""
    if tag is not None:
        validate_reference(tag)
    if (outputs.load or outputs.push) and tag is None:
        raise UsageError("--load and --push need a tag", hint="pass -t IMAGE:TAG")
    if image.system_packages:
        raise UsageError(
            "--system-package needs apt inside the image, which only the Docker backend runs",
            hint="use --backend docker, or a base image that already has the packages",
        )
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    base_image = image.base_for(read_spec(sourced.path, sourced.files))
    # The base before locking: a base for another platform is refused before any resolution.
    store = blobs.BlobStore((cache_root or default_cache_root()) / "oci")
    base = bases.load_base(
        base_image, store, client_factory=engine.connect, platform=image.lock.platform
    )
    bases.check_platform(base, image.lock.platform)
    report = lock_model(
        reference,
        replace(image.lock, download=True),
        options=options,
        cache=cache,
        cache_root=cache_root,
        progress=progress,
        cwd=cwd,
        sourced=sourced,
    )
    if report.wheelhouse is None:  # pragma: no cover - download=True always fills it
        raise UsageError("internal: no wheelhouse")
    lock_ = report.result.lock
    plan = plan_context(
        report.spec,
        report.provenance,
        lock_,
        report.wheelhouse,
        base_image=base_image,
        base_digest=base.digest,
        system_packages=image.system_packages,
        bytecode=image.bytecode,
        keep_tests=image.keep_tests,
        dockerfile=False,
        conda=_conda_part(report, cache_root),
    )
    epoch = epoch_for(report.provenance, report.spec)
    built = assemble.assemble(
        assemble.Inputs(
            plan=plan,
            lock_text=lock_.render(),
            manifest=wheelhouse_manifest(report.wheelhouse),
            wheels=tuple(w.path for w in sorted(report.wheelhouse.files, key=lambda w: w.filename)),
            python=lock_.target.python,
            platform=lock_.target.platform,
            epoch=epoch,
        ),
        base,
        store,
    )
    if outputs.layout is not None:
        export.write_layout(built, outputs.layout, tag=tag)
    if outputs.archive is not None:
        export.write_docker_archive(built, outputs.archive, tag=tag, epoch=epoch)
    layers_loaded = None
    if outputs.load and tag is not None:
        layers_loaded = _load(
            built, tag, epoch, base_reference=base_image, lock_digest=lock_.digest
        )
    pushed = None
    if outputs.push and tag is not None:
        pushed = push_image(
            tag,
            built.manifest,
            built.manifest_digest,
            blobs.MANIFEST_MEDIA_TYPE,
            [(built.config_digest, store.path(built.config_digest))]
            + [(digest, store.path(digest)) for _, digest, _ in built.layers],
        )
    return OciBuilt(
        manifest_digest=built.manifest_digest,
        image_id=built.config_digest,
        tag=tag,
        epoch=epoch,
        layers=len(built.layers),
        layers_written=built.written,
        size_bytes=sum(store.content_size(digest) for _, digest, _ in built.layers),
        layers_bytes=sum(size for _, _, size in built.layers),
        base_image=base_image,
        lock_digest=lock_.digest,
        layout=str(outputs.layout) if outputs.layout else None,
        archive=str(outputs.archive) if outputs.archive else None,
        loaded=outputs.load,
        layers_loaded=layers_loaded,
        pushed=pushed,
    )


def _load(
    built: assemble.OciImage, tag: str, epoch: int, *, base_reference: str, lock_digest: str
) -> int:
    """Load into the engine untagged, check the id, then tag: no tag on a failed load.

    Layers the engine already has (from the base, the image the tag names now, or an image
    built from the same lock) are left out of the archive, so a new model version sends
    only its own layers. If the engine lost one of them meanwhile, the load is retried
    with every layer.
    """
    client = engine.connect()
    omit = _layers_the_engine_has(client, built, base_reference, tag, lock_digest)
    with tempfile.TemporaryDirectory(prefix="packager-load-", dir=built.store.tmp) as tmp:
        archive = Path(tmp) / "image.tar"
        export.write_docker_archive(built, archive, tag=None, epoch=epoch, omit_layers=omit)
        try:
            loaded = engine.load(client, archive)
        except ImageBuildError as err:
            if not omit:
                raise
            log.info("loading again with every layer (%s)", err)
            omit = frozenset()
            export.write_docker_archive(built, archive, tag=None, epoch=epoch)
            loaded = engine.load(client, archive)
    if built.config_digest not in loaded:
        raise ImageBuildError(
            f"the engine loaded {', '.join(loaded) or 'nothing'}, not {built.config_digest}"
        )
    engine.tag(client, built.config_digest, tag)
    return len({d for _, d, _ in built.layers} - omit)


def _layers_the_engine_has(
    client: Any, built: assemble.OciImage, base_reference: str, tag: str, lock_digest: str
) -> frozenset[str]:
    """Digests of the image's leading layers that the engine holds as the same chain."""
    ours = tuple(export.diff_ids(built))
    stacks = engine.layer_stacks(
        client, references=[base_reference, tag], labels={LOCK_DIGEST_LABEL: lock_digest}
    )
    shared = max((_shared_prefix(ours, stack) for stack in stacks), default=0)
    omitted = frozenset(digest for _, digest, _ in built.layers[:shared])
    log.debug("the engine has %d of %d layers; sending the others", shared, len(ours))
    return omitted


def _shared_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading items ``a`` and ``b`` have in common."""
    return next(
        (n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


@dataclass(frozen=True, kw_only=True)
class ReproducibilityReport:
    reproducible: bool
    digests: tuple[str, str]
    first_difference: str | None  # "layer N (comment): /path differs" on a mismatch


def check_reproducible(
    reference: str,
    image: ImageOptions,
    *,
    options: RegistryOptions | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> ReproducibilityReport:
    """Build twice, each from empty caches, and compare the manifest digests."""
    results: list[OciBuilt] = []
    stores: list[blobs.BlobStore] = []
    with tempfile.TemporaryDirectory(prefix="packager-repro-") as tmp:
        for run_number in (1, 2):
            root = Path(tmp) / f"cache-{run_number}"
            log.info("reproducibility check: build %d of 2 from an empty cache", run_number)
            results.append(
                build_oci_image(
                    reference,
                    image,
                    OciOutputs(),
                    options=options,
                    cache=ModelCache(root),
                    cache_root=root,
                    progress=progress,
                    cwd=cwd,
                )
            )
            stores.append(blobs.BlobStore(root / "oci"))
        digests = (results[0].manifest_digest, results[1].manifest_digest)
        difference = (
            None
            if digests[0] == digests[1]
            else export.first_difference(stores[0], stores[1], digests[0], digests[1])
        )
    return ReproducibilityReport(
        reproducible=digests[0] == digests[1], digests=digests, first_difference=difference
    )
