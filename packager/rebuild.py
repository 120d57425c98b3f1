"""``packager rebuild IMAGE@sha256:…``: check that a released image is what it claims.

A released image carries a provenance statement (:mod:`packager.attest`) naming the model
version, the lock (its full text, not just a digest: a new resolution could pick newer
releases), the base by digest and the build options. This module repeats that build from
empty caches, with the daemonless OCI backend, and compares manifest digests. It never
trusts the image's own labels for the recipe, only the provenance pushed next to it, and
it says which input no longer matches before building (the model version's files changed,
the base moved) rather than reporting a mysterious digest mismatch.

On a mismatch the original image is pulled into a scratch blob store and compared layer
by layer with the rebuild, as ``build --check-reproducible`` does.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packager import __version__, api, attest, publish
from packager.cache import ModelCache
from packager.env.inputs import IndexOptions
from packager.env.lock import read_lock
from packager.errors import ImageBuildError, PackagerError, PushError, RebuildError, UsageError
from packager.image import bases, blobs, engine, export
from packager.image.registry import Client, parse_target
from packager.progress import Progress
from packager.reference import parse_reference
from packager.source import RegistryOptions, fetch_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RebuildReport:
    image: str  # REGISTRY/REPO@sha256:… as given
    model: str  # models:/NAME/VERSION from the provenance
    base: str  # the base reference, and the digest it had
    base_digest: str
    lock_digest: str
    built_by: str  # the packager version that built the image
    rebuilt: str  # the rebuild's manifest digest
    reproducible: bool
    first_difference: str | None


def rebuild(
    image: str,
    *,
    base_image: str | None = None,
    registry: RegistryOptions | None = None,
    index: IndexOptions | None = None,
    progress: Progress | None = None,
) -> RebuildReport:
    """Rebuild ``image`` (``REGISTRY/REPO@sha256:…``) from its provenance, from empty
    caches, and compare. ``base_image`` names another place to get the same base from
    (it must have the recorded digest)."""
    name, _, digest = image.partition("@")
    if not digest.startswith("sha256:"):
        raise UsageError(f"{image} is not pinned by digest", hint="pass REGISTRY/REPO@sha256:…")
    with tempfile.TemporaryDirectory(prefix="packager-rebuild-") as tmp:
        scratch = Path(tmp)
        try:
            fetched = publish.fetch_attestations(image, ("att",), scratch)
        except PushError as err:
            raise RebuildError(
                f"no provenance could be read next to {image}: {err.message}",
                hint="only images released by `packager release` (with attestations, the "
                "default) carry one; check the registry and the digest",
            ) from err
        try:
            recipe = attest.recipe_from(fetched.documents["att"])
        except attest.ProvenanceError as err:
            raise RebuildError(
                f"the provenance of {image} cannot be followed: {err}",
                hint="release the model again with this packager (`packager release --force`)",
            ) from err
        if recipe.subject != digest:
            raise RebuildError(f"the provenance pushed next to {image} is about {recipe.subject}")
        if recipe.options.backend != "oci":
            raise RebuildError(
                f"{image} was built with the {recipe.options.backend} backend, whose images "
                "do not reproduce byte for byte",
                hint="only images built with the OCI backend (the default) can be rebuilt "
                "and compared",
            )
        if recipe.packager_version != __version__:
            # Not refused: nothing may have changed. But a mismatch then has a likely cause.
            log.warning(
                "%s was built by packager %s, this is packager %s: if the digests differ, "
                "rebuild with packager %s",
                image,
                recipe.packager_version,
                __version__,
                recipe.packager_version,
            )
        lock_path = scratch / "requirements.lock"
        lock_path.write_text(recipe.lock_text)
        target = read_lock(lock_path).target
        root = scratch / "cache"
        cache = ModelCache(root)
        _check_model(recipe, registry, cache, progress)
        base_reference = base_image or recipe.base_reference
        _check_base(recipe, base_reference, blobs.BlobStore(root / "oci"), target.platform)
        options = api.ImageOptions(
            base_image=base_reference,
            bytecode=recipe.options.bytecode,
            keep_tests=recipe.options.keep_tests,
            lock=api.LockOptions(
                lock_file=lock_path,
                mlflow_skinny=recipe.options.mlflow_skinny,
                ignore_conda=recipe.options.ignore_conda,
                platform=target.platform,
                python=target.python_full or target.python,
                index=index or IndexOptions(),
            ),
        )
        log.info("rebuilding %s from empty caches", recipe.model_uri)
        built = api.build_oci_image(
            recipe.model_uri,
            options,
            api.OciOutputs(),
            options=registry,
            cache=cache,
            cache_root=root,
            progress=progress,
        )
        difference = None
        if built.manifest_digest != digest:
            original = blobs.BlobStore(scratch / "original")
            _pull(name, digest, original)
            difference = export.first_difference(
                original, blobs.BlobStore(root / "oci"), digest, built.manifest_digest
            )
    return RebuildReport(
        image=image,
        model=recipe.model_uri,
        base=recipe.base_reference,
        base_digest=recipe.base_digest,
        lock_digest=recipe.lock_digest,
        built_by=recipe.packager_version,
        rebuilt=built.manifest_digest,
        reproducible=built.manifest_digest == digest,
        first_difference=difference,
    )


def _check_model(
    recipe: attest.Recipe,
    registry: RegistryOptions | None,
    cache: ModelCache,
    progress: Progress | None,
) -> None:
    """The model version must still hold the files the image was built from."""
    sourced = fetch_model(
        parse_reference(recipe.model_uri, cwd=Path.cwd()),
        options=registry,
        cache=cache,
        progress=progress,
    )
    found = sourced.provenance.content_digest
    if found != recipe.model_digest:
        raise RebuildError(
            f"{recipe.model_uri} now holds other files ({found}) than the image was built "
            f"from ({recipe.model_digest})",
            hint="its artifacts were changed after the release; the image cannot be rebuilt "
            "from this registry",
        )


def _check_base(
    recipe: attest.Recipe, reference: str, store: blobs.BlobStore, platform: str
) -> None:
    """The base must be the very one the release used (its manifest digest), for the
    lock's platform."""
    try:
        base = bases.load_base(reference, store, client_factory=engine.connect, platform=platform)
    except PackagerError as err:
        raise RebuildError(
            f"the base {reference} is not available here: {err.message}",
            hint=f"pass --base-image with a place that has {recipe.base_reference} at "
            f"{recipe.base_digest} (an engine tag, an OCI layout or archive, a registry)",
        ) from err
    if base.digest != recipe.base_digest:
        raise RebuildError(
            f"the base {reference} is {base.digest}, the release used {recipe.base_digest}",
            hint="the tag moved since the release: pass --base-image with the recorded "
            "digest (for packager's own bases, `packager base build` makes the same bytes)",
        )


def _pull(name: str, digest: str, store: blobs.BlobStore) -> None:
    """The image's manifest, config and layers into ``store`` (each digest-checked)."""
    client = Client(parse_target(f"{name}:probe"))
    body, _ = client.get_manifest(digest)
    if store.put_bytes(body) != digest:
        raise ImageBuildError(f"the registry sent a manifest that does not match {digest}")
    manifest = json.loads(body)
    for blob in (manifest["config"], *manifest["layers"]):
        if not store.has(blob["digest"]):
            partial = store.tmp / f"{blob['digest'][7:]}.partial"
            client.fetch_blob(blob["digest"], partial)
            store.put_file(partial, blob["digest"])
