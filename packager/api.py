"""The library's front door: one function per CLI command, typed in and out.

The CLI only parses arguments into these calls and prints their results; anything a
pipeline can do with ``packager <command>`` it can do by importing this module.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from packager.cache import ModelCache, default_cache_root
from packager.env.inputs import IndexOptions, LockInputs, build_inputs
from packager.env.resolve import LockResult, lock, make_resolver
from packager.env.target import Target
from packager.env.wheelhouse import Wheelhouse, build_wheelhouse
from packager.errors import ImageBuildError, UnsupportedRequirementError, UsageError
from packager.image import engine
from packager.image.base import validate_reference
from packager.progress import Progress
from packager.reference import parse_reference
from packager.source import Provenance, RegistryOptions, fetch_model
from packager.spec import LineKind, ModelSpec, read_spec
from packager.stage import BuildPlan, plan_context, write_context
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
    if importlib.util.find_spec("uvicorn") is None:
        raise UsageError(
            "packager serve needs the server's dependencies in this environment",
            hint="pip install 'mlflow-packager[server]'",
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
class LockOptions:
    resolver: str = "uv"
    python: str | None = None  # default: the model's
    platform: str = "linux/amd64"
    index: IndexOptions = field(default_factory=IndexOptions)
    lock_file: Path | None = None  # a lock the user keeps: verified, used as is
    download: bool = False  # also fill the wheelhouse
    mlflow_skinny: bool = False  # swap mlflow for mlflow-skinny where verified
    ignore_conda: bool = False  # lock the pip requirements of a model that needs conda


@dataclass(frozen=True, kw_only=True)
class LockReport:
    provenance: Provenance
    spec: ModelSpec
    inputs: LockInputs
    result: LockResult
    wheelhouse: Wheelhouse | None


def lock_model(
    reference: str,
    lock_options: LockOptions,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
) -> LockReport:
    """Resolve the model's requirements (and the server's) into a hash-pinned lock."""
    from packager_server import REQUIREMENTS  # noqa: PLC0415 - the server declares its needs

    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache, progress=progress)
    spec = read_spec(sourced.path, sourced.files)
    if spec.conda is not None and spec.conda.needs_conda and not lock_options.ignore_conda:
        raise UnsupportedRequirementError(
            "the model's conda.yaml needs conda packages ("
            + ", ".join(spec.conda.conda_packages)
            + "), and packager does not lock conda packages yet; an image built from the pip "
            "requirements alone would lack them",
            hint="install them as system packages in the image instead and pass "
            "--ignore-conda, or log the model with pip-only requirements",
        )
    target = Target.make(lock_options.python or spec.python_version, lock_options.platform)
    inputs = build_inputs(
        spec, target, lock_options.index, REQUIREMENTS, mlflow_skinny=lock_options.mlflow_skinny
    )
    root = cache_root or default_cache_root()
    result = lock(
        inputs,
        make_resolver(lock_options.resolver),
        cache_root=root,
        lock_file=lock_options.lock_file,
    )
    wheelhouse = (
        build_wheelhouse(result.lock, inputs, cache_root=root) if lock_options.download else None
    )
    return LockReport(
        provenance=sourced.provenance,
        spec=spec,
        inputs=inputs,
        result=result,
        wheelhouse=wheelhouse,
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
            + "); the image will need conda-lock and micromamba"
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
    base_image: str
    system_packages: tuple[str, ...] = ()
    lock: LockOptions = field(default_factory=LockOptions)


@dataclass(frozen=True, kw_only=True)
class GeneratedContext:
    directory: Path
    plan: BuildPlan
    lock: LockReport


@dataclass(frozen=True, kw_only=True)
class BuiltImage:
    image_id: str
    tags: tuple[str, ...]
    size_bytes: int
    base_image: str
    base_image_id: str
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
    )
    if report.wheelhouse is None:  # pragma: no cover - download=True always fills it
        raise UsageError("internal: no wheelhouse")
    plan = plan_context(
        report.spec,
        report.provenance,
        report.result.lock,
        report.wheelhouse,
        base_image=image.base_image,
        system_packages=image.system_packages,
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
    base_id = _check_base(
        client, image.base_image, reference, options=options, cache=cache, cwd=cwd
    )
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
        )
        image_id = _build_with_retry(client, context.directory, on_log)
    engine.tag(client, image_id, tag)
    built = client.images.get(image_id)
    return BuiltImage(
        image_id=image_id,
        tags=(tag,),
        size_bytes=int(built.attrs["Size"]),
        base_image=image.base_image,
        base_image_id=base_id,
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


def _check_base(
    client: object,
    base: str,
    reference: str,
    *,
    options: RegistryOptions | None,
    cache: ModelCache | None,
    cwd: Path | None,
) -> str:
    """The base image's id; refuses a base whose Python differs from the model's."""
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache)
    spec = read_spec(sourced.path, sourced.files)
    found = engine.base_python(client, base)
    if found.python is not None and found.python != spec.python_minor:
        raise UsageError(
            f"the base image {base} has Python {found.python}, the model needs {spec.python_minor}",
            hint=f"build one with `packager base build --python {spec.python_minor} -t TAG` "
            "or pass another --base-image",
        )
    return found.image_id


def verify_built_image(
    image: str,
    reference: str,
    *,
    payloads: tuple[Path, ...] = (),
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cwd: Path | None = None,
) -> TestReport:
    """Run ``image`` and check it answers as MLflow does for ``reference``'s model."""
    ref = parse_reference(reference, cwd=cwd or Path.cwd())
    sourced = fetch_model(ref, options=options, cache=cache)
    return verify_image(image, model_dir=sourced.path, payloads=payloads)
