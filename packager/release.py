"""``packager release``: lock → build → test → push → record, in one process.

A release pipeline's build step, safe to re-run. The order is what makes it safe:

- nothing is pushed before the image passed its test (when an engine can run it);
- the registry gets the manifest after its blobs (:mod:`packager.image.registry`), so a
  killed push leaves only unreferenced blobs, which the next push reuses;
- the model version's tags are written after the push, and the alias moved last, so a
  version never names an image the registry lacks;
- a re-run whose recorded image is in the registry with the same recipe (lock digest,
  base digest, packager version, all in the version's tags) stops with "already
  released"; anything less (an interrupted run, a new lock, a deleted image) builds again,
  and every stage reuses what its caches hold.

It reuses the library functions behind ``build``, ``test`` and ``push``; it never runs the
CLI.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from packager import __version__, api, attest, publish, record
from packager.cache import ModelCache, default_cache_root
from packager.deploy import inputs as deploy_inputs
from packager.deploy import manifests as deploy_manifests
from packager.env.wheelhouse import build_wheelhouse
from packager.errors import ImageTestError, PackagerError, UsageError
from packager.image import bases, blobs, engine
from packager.image.base import validate_reference
from packager.image.registry import parse_target
from packager.image.rootfs import base_rootfs
from packager.progress import Progress
from packager.reference import parse_reference
from packager.source import RegistryOptions, SourcedModel, fetch_model
from packager.spec import read_spec
from packager.verify import TestReport, verify_image

log = logging.getLogger(__name__)

Backend = Literal["oci", "docker"]


@dataclass(frozen=True, kw_only=True)
class ReleaseOptions:
    # REGISTRY/REPO[:TAG]; the first is the one recorded. Without :TAG, the tag is
    # NAME-VERSION of the model version released.
    tags: tuple[str, ...]
    image: api.ImageOptions = field(default_factory=api.ImageOptions)
    backend: Backend = "oci"
    test: bool = True
    alias: str | None = None
    force: bool = False
    attestations: bool = True  # push an SBOM and a provenance statement next to the image
    attestations_dir: Path | None = None  # also write them here
    # Write Kubernetes manifests for the pushed digest into DIR/NAME (NAME: the model's
    # name as a DNS label), sized from the release's test.
    manifests_dir: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ReleaseReport:
    model: str  # the reference as given
    model_name: str
    model_version: str
    status: Literal["released", "already released"]
    image: str  # REGISTRY/REPO@sha256:…
    tags: tuple[str, ...]  # pushed by this run (none when already released)
    lock_digest: str
    base_digest: str
    packager_version: str
    tested: bool
    test_skipped: str | None  # why the image was not tested
    test: TestReport | None
    recorded: record.Recorded | None
    attestations: tuple[publish.PushedAttestation, ...]
    manifests: deploy_manifests.Written | None
    manifests_skipped: str | None  # why --manifests wrote nothing
    steps: tuple[Step, ...]


class _Timer:
    """Each step's wall time, for the report; each step announced as it starts."""

    def __init__(self, on_step: Callable[[str], None] | None = None) -> None:
        self.steps: list[Step] = []
        self.on_step = on_step

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_step is not None:
            self.on_step(name)
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps.append(Step(name=name, seconds=round(time.monotonic() - start, 3)))


def release_model(
    reference: str,
    options: ReleaseOptions,
    *,
    registry: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    cwd: Path | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ReleaseReport:
    """Release ``reference`` (a registered model version) to ``options.tags``;
    ``on_step`` hears each step's name as it starts (the CLI's one-line-per-step display)."""
    _check_tags(options.tags)
    if options.manifests_dir is not None and not options.test:
        raise UsageError(
            "--manifests is sized from the release's test, and --no-test skips it",
            hint="drop --no-test, or run `packager manifests IMAGE --startup-seconds S "
            "--memory M` after the release",
        )
    timer = _Timer(on_step)
    with timer("source"):
        ref = parse_reference(reference, cwd=cwd or Path.cwd())
        sourced = fetch_model(ref, options=registry, cache=cache, progress=progress)
        version = record.version_of(sourced.provenance, registry)
    options = replace(options, tags=tuple(_tag_for(t, version) for t in options.tags))
    root = cache_root or default_cache_root()
    with timer("lock"):
        inputs = _recipe(reference, sourced, options, cache_root=root, progress=progress)
    recipe = inputs.tags
    if not options.force:
        with timer("check"):
            recorded = _already_released(version, recipe, options.tags[0])
        if recorded is not None:
            log.info("%s is already released as %s", reference, recorded)
            moved = None
            if options.alias is not None:
                with timer("record"):
                    moved = record.move_alias(version, options.alias, image=recorded)
            return _report(
                reference,
                version,
                recipe,
                timer,
                image=recorded,
                tags=(),
                recorded=moved,
                manifests_skipped=_skip_manifests(
                    options, "already released: the first release wrote them"
                ),
            )
    will_test = options.test and engine.reachable()
    with timer("build"):
        if options.backend == "oci":
            built = api.build_oci_image(
                reference,
                options.image,
                api.OciOutputs(load=will_test),
                tag=options.tags[0] if will_test else None,
                options=registry,
                cache=cache,
                cache_root=root,
                progress=progress,
                cwd=cwd,
            )
            manifest_digest, epoch = built.manifest_digest, built.epoch
        else:
            docker_built = api.build_image(
                reference,
                options.tags[0],
                options.image,
                options=registry,
                cache=cache,
                cache_root=root,
                progress=progress,
                cwd=cwd,
            )
            manifest_digest = docker_built.image_id
            epoch = api.epoch_for(sourced.provenance, inputs.lock.spec)
    test_report = None
    if will_test:
        with timer("test"):
            test_report = verify_image(
                options.tags[0], model_digest=sourced.provenance.content_digest
            )
        if not test_report.passed:
            raise ImageTestError(
                f"the image of {reference} failed its test, so nothing was pushed",
                hint=f"run `packager test {options.tags[0]}` to see which check failed",
            )
    with timer("push"):
        pinned = _push(options, manifest_digest, blobs.BlobStore(root / "oci"))
    attested: tuple[publish.PushedAttestation, ...] = ()
    if options.attestations:
        with timer("attest"):
            attested = _attest(
                pinned,
                sourced,
                inputs,
                epoch,
                options.attestations_dir,
                image=options.image,
                backend=options.backend,
                cache_root=root,
            )
    with timer("record"):
        tags = {record.IMAGE_TAG: pinned, **recipe}
        recorded_here = record.record_release(version, tags, alias=options.alias, image=pinned)
    written, skipped = _manifests_step(options, test_report, pinned, timer)
    return _report(
        reference,
        version,
        recipe,
        timer,
        image=pinned,
        tags=options.tags,
        test=test_report,
        skipped=None if will_test else _why_untested(options),
        recorded=recorded_here,
        attestations=attested,
        manifests=written,
        manifests_skipped=skipped,
    )


def _check_tags(tags: tuple[str, ...]) -> None:
    """Every tag a valid reference that names a registry, before anything is built."""
    if not tags:
        raise UsageError("a release needs a registry to push to", hint="pass -t REGISTRY/REPO:TAG")
    for tag in tags:
        validate_reference(tag)
        parse_target(tag)


def has_tag(reference: str) -> bool:
    """Whether ``REGISTRY/REPO[:TAG]`` names a tag (a port's colon is not one)."""
    return ":" in reference.rsplit("/", 1)[-1]


def _tag_for(reference: str, version: record.VersionRef) -> str:
    """``reference`` itself when it names a tag, else ``reference:NAME-VERSION`` (the
    characters a tag may not hold replaced by ``_``)."""
    if has_tag(reference):
        return reference
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{version.name}-{version.version}").lstrip(".-")
    return validate_reference(f"{reference}:{tag[:128] or 'model'}")


@dataclass(frozen=True, kw_only=True)
class _Recipe:
    """What decides the image besides the model: the lock, the base, packager itself."""

    lock: api.LockReport
    base: bases.Base
    base_reference: str

    @property
    def tags(self) -> dict[str, str]:
        """The recipe as the model version's tags record it."""
        return {
            record.LOCK_DIGEST_TAG: self.lock.result.lock.digest,
            record.BASE_DIGEST_TAG: self.base.digest,
            record.VERSION_TAG: __version__,
        }


def current_recipe(
    reference: str,
    options: ReleaseOptions,
    *,
    registry: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
) -> dict[str, str]:
    """The recipe tags a release of ``reference`` with ``options`` would record now
    (lock digest, base digest, packager version), without building anything: what the
    webhook's reconciliation compares with a version's recorded tags. The model, the lock
    and the base come from their caches once a release has filled them."""
    ref = parse_reference(reference, cwd=Path.cwd())
    sourced = fetch_model(ref, options=registry, cache=cache)
    root = cache_root or default_cache_root()
    return _recipe(reference, sourced, options, cache_root=root, progress=None).tags


def _recipe(
    reference: str,
    sourced: SourcedModel,
    options: ReleaseOptions,
    *,
    cache_root: Path,
    progress: Progress | None,
) -> _Recipe:
    """Lock and load the base: both are served from their caches after the first release,
    so an "already released" answer costs little more than the registry look-ups."""
    spec = read_spec(sourced.path, sourced.files)
    store = blobs.BlobStore(cache_root / "oci")
    base_reference = options.image.base_for(spec)
    base = bases.load_base(
        base_reference,
        store,
        client_factory=engine.connect,
        platform=options.image.lock.platform,
    )
    locked = api.lock_model(
        reference,
        replace(options.image.lock, download=False),
        cache_root=cache_root,
        progress=progress,
        sourced=sourced,
    )
    return _Recipe(lock=locked, base=base, base_reference=base_reference)


def _attest(
    pinned: str,
    sourced: SourcedModel,
    inputs: _Recipe,
    epoch: int,
    directory: Path | None,
    *,
    image: api.ImageOptions,
    backend: Backend,
    cache_root: Path,
) -> tuple[publish.PushedAttestation, ...]:
    """The SBOM and the provenance statement of the pushed image, pushed next to it (and
    written to ``directory``). The wheelhouse and the base's root file system come from
    the caches the build just filled."""
    lock = inputs.lock.result.lock
    wheelhouse = build_wheelhouse(lock, inputs.lock.inputs, cache_root=cache_root)
    rootfs = base_rootfs(inputs.base, blobs.BlobStore(cache_root / "oci"))
    status = rootfs / "var" / "lib" / "dpkg" / "status"
    prov = sourced.provenance
    facts = attest.ImageFacts(
        repository=pinned.partition("@")[0],
        digest=pinned.partition("@")[2],
        epoch=epoch,
        provenance=prov,
        model_uri=f"models:/{prov.model_name}/{prov.model_version}",
        lock_digest=lock.digest,
        base_reference=inputs.base_reference,
        base_digest=inputs.base.digest,
        wheels=tuple(sorted(wheelhouse.files, key=lambda w: w.name)),
        debian=attest.dpkg_packages(status.read_text()) if status.is_file() else (),
        conda=lock.conda.packages if lock.conda is not None else (),
        lock_text=lock.render(),
        options=attest.BuildOptions(
            bytecode=image.bytecode,
            keep_tests=image.keep_tests,
            mlflow_skinny=image.lock.mlflow_skinny,
            ignore_conda=image.lock.ignore_conda,
            backend=backend,
        ),
    )
    documents = (
        ("sbom", attest.SBOM_MEDIA_TYPE, attest.sbom(facts)),
        ("att", attest.PROVENANCE_MEDIA_TYPE, attest.provenance_statement(facts)),
    )
    pushed = []
    with tempfile.TemporaryDirectory(prefix="packager-attest-") as scratch:
        for kind, media_type, document in documents:
            if directory is not None:
                _write(directory, facts.digest, kind, document)
            pushed.append(
                publish.push_attestation(pinned, kind, media_type, document, Path(scratch))
            )
    return tuple(pushed)


def _write(directory: Path, digest: str, kind: str, document: bytes) -> None:
    """``DIR/sha256-<hex>.<kind>.json``, renamed into place whole."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{digest.replace(':', '-')}.{kind}.json"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(document)
    partial.replace(path)


def _already_released(version: record.VersionRef, recipe: dict[str, str], tag: str) -> str | None:
    """The recorded image, if the version's tags name one in ``tag``'s repository, built
    from ``recipe``, that the registry still holds."""
    tags = record.version_tags(version)
    image = tags.get(record.IMAGE_TAG, "")
    if not image or any(tags.get(key) != value for key, value in recipe.items()):
        return None
    target = parse_target(tag)
    if image.partition("@")[0] != f"{target.registry}/{target.repository}":
        return None
    return image if publish.manifest_exists(image) else None


def _push(options: ReleaseOptions, manifest_digest: str, store: blobs.BlobStore) -> str:
    """Push to every tag; the first tag's ``repo@digest`` is what gets recorded."""
    pinned: list[str] = []
    for tag in options.tags:
        if options.backend == "oci":
            pinned.append(publish.push_stored(tag, manifest_digest, store).pinned)
        else:
            client = engine.connect()
            engine.tag(client, manifest_digest, tag)
            pinned.append(publish.push(tag, client=client).pinned)
    return pinned[0]


def _manifests_step(
    options: ReleaseOptions, report: TestReport | None, pinned: str, timer: _Timer
) -> tuple[deploy_manifests.Written | None, str | None]:
    """``--manifests``: what was written, or why nothing was."""
    if options.manifests_dir is None:
        return None, None
    measured = _measured(report)
    if isinstance(measured, str):
        return None, _skip_manifests(options, measured)
    with timer("manifests"):
        return _write_manifests(pinned, measured, options.manifests_dir), None


def _measured(report: TestReport | None) -> deploy_inputs.Measured | str:
    """The test's start-up time and memory, or why there are none."""
    if report is None:
        return "the image was not tested (no Docker engine answers), so nothing was measured"
    if report.memory_bytes is None:
        return "the test could not read the container's memory (docker stats)"
    return deploy_inputs.Measured(
        startup_seconds=report.startup_seconds,
        memory_bytes=report.memory_bytes,
        source="packager release's test",
    )


def _skip_manifests(options: ReleaseOptions, why: str) -> str | None:
    if options.manifests_dir is None:
        return None
    log.warning("--manifests: none written: %s", why)
    return why


def _write_manifests(
    pinned: str, measured: deploy_inputs.Measured, directory: Path
) -> deploy_manifests.Written:
    """The default manifests (``packager manifests``' defaults) for the pushed digest, in
    DIR/NAME; a previous release's files there are replaced (the release owns them)."""
    image = deploy_inputs.read_image(pinned)
    name = deploy_manifests.resource_name(None, dict(image.labels)[deploy_inputs.MODEL_LABEL])
    return deploy_manifests.write_manifests(
        image, measured, deploy_manifests.ManifestOptions(), directory / name, force=True
    )


def _why_untested(options: ReleaseOptions) -> str:
    if not options.test:
        return "--no-test"
    return "no Docker engine answers, so the image could not be run"


def _report(
    reference: str,
    version: record.VersionRef,
    recipe: dict[str, str],
    timer: _Timer,
    *,
    image: str,
    tags: tuple[str, ...],
    test: TestReport | None = None,
    skipped: str | None = None,
    recorded: record.Recorded | None = None,
    attestations: tuple[publish.PushedAttestation, ...] = (),
    manifests: deploy_manifests.Written | None = None,
    manifests_skipped: str | None = None,
) -> ReleaseReport:
    return ReleaseReport(
        model=reference,
        model_name=version.name,
        model_version=version.version,
        status="released" if tags else "already released",
        image=image,
        tags=tags,
        lock_digest=recipe[record.LOCK_DIGEST_TAG],
        base_digest=recipe[record.BASE_DIGEST_TAG],
        packager_version=recipe[record.VERSION_TAG],
        tested=test is not None,
        test_skipped=skipped if test is None and tags else None,
        test=test,
        recorded=recorded,
        attestations=attestations,
        manifests=manifests,
        manifests_skipped=manifests_skipped,
        steps=tuple(timer.steps),
    )


@dataclass(frozen=True, kw_only=True)
class Failure:
    model: str
    error: str
    exit_code: int


def release_models(
    references: tuple[str, ...],
    options: ReleaseOptions,
    *,
    registry: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[ReleaseReport | Failure, ...]:
    """Release each reference in turn (they share the lock, wheel and layer caches); one
    failure is reported and the others still run. ``announce`` hears a line per step:
    ``[2/3] models:/b/1: build``."""
    results: list[ReleaseReport | Failure] = []
    for number, reference in enumerate(references, 1):

        def on_step(step: str, where: str = f"[{number}/{len(references)}] {reference}") -> None:
            if announce is not None:
                announce(f"{where}: {step}")

        try:
            results.append(
                release_model(
                    reference,
                    options,
                    registry=registry,
                    cache=cache,
                    cache_root=cache_root,
                    progress=progress,
                    on_step=on_step,
                )
            )
        except PackagerError as err:
            log.warning("releasing %s failed: %s", reference, err.message)
            results.append(Failure(model=reference, error=err.message, exit_code=err.exit_code))
    return tuple(results)


@dataclass(frozen=True, kw_only=True)
class AttestationCheck:
    image: str
    attestations: dict[str, str]  # kind → REGISTRY/REPO@sha256:… of the artifact
    problems: tuple[str, ...]
    directory: Path | None  # where the documents were written, if asked

    @property
    def verified(self) -> bool:
        return not self.problems


def check_attestations(image: str, directory: Path | None = None) -> AttestationCheck:
    """Fetch the SBOM and provenance pushed next to ``image`` (``REGISTRY/REPO@sha256:…``)
    and check they describe it: subject digests, and the model and lock its labels name."""
    with tempfile.TemporaryDirectory(prefix="packager-attest-") as scratch:
        fetched = publish.fetch_attestations(image, ("sbom", "att"), Path(scratch))
    digest = image.partition("@")[2]
    if directory is not None:
        for kind, document in fetched.documents.items():
            _write(directory, digest, kind, document)
    problems = attest.check(
        digest, fetched.labels, fetched.documents["sbom"], fetched.documents["att"]
    )
    return AttestationCheck(
        image=image, attestations=fetched.references, problems=problems, directory=directory
    )
