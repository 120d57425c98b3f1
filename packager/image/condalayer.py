"""A model's conda packages as one image layer at ``/opt/conda``, the same for both backends.

:func:`conda_part` installs the lock's conda packages (their archives from the sha256
cache, already checked against the lock) with :mod:`packager.env.condaprefix` into a
staging directory for the final prefix, and writes that tree as a deterministic tar layer
(:mod:`packager.image.layers`: sorted entries, root owner, normalized modes, fixed times)
into the OCI blob store, keyed by what went into it: the archives' sha256, the prefix,
the installer. A second build of any model with the same conda packages reuses the blob
without installing anything.

The OCI backend puts the blob in the image as it is. The Docker backend ships the same
blob in its build context and ``ADD``s it (the engine unpacks a local tar), so both images
hold the same ``/opt/conda`` tree.

When the environment provides ``python``, ``/opt/conda/bin/pythonX.Y`` becomes the venv's
interpreter (as MLflow's conda env manager runs the model with the environment's Python),
and the venv sees the environment's own site-packages (its ``noarch: python`` packages)
after its own. Otherwise the base's Python stays, and the prefix provides libraries and
tools through ``PATH`` and ``LD_LIBRARY_PATH`` (:func:`packager.stage.plan_context` sets
them).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packager.env import condaprefix
from packager.env.condalock import CondaLock
from packager.env.condapkgs import CondaFile
from packager.errors import ImageBuildError
from packager.image.blobs import LAYER_FORMAT, BlobStore, canonical_json
from packager.image.layers import Layer, entries_from_tree, file_digest

log = logging.getLogger(__name__)

PREFIX = condaprefix.PREFIX


@dataclass(frozen=True, kw_only=True)
class CondaPart:
    """The conda layer of an image and what the rest of the image needs to know of it."""

    layer: Layer
    prefix: str
    python: str | None  # X.Y when the environment provides python
    packages: tuple[str, ...]  # name=version=build, in the lock's order

    @property
    def interpreter(self) -> str | None:
        """The venv's interpreter when the environment provides python."""
        return None if self.python is None else f"{self.prefix}/bin/python{self.python}"


def conda_part(
    lock: CondaLock, files: Sequence[CondaFile], store: BlobStore, *, epoch: int
) -> CondaPart:
    """The layer for ``lock``'s packages (``files``: every one, from the cache)."""
    python = ".".join(lock.python.split(".")[:2]) if lock.python else None
    packages = tuple(f"{p.name}={p.version}={p.build}" for p in lock.packages)
    material = [
        sorted((file.file_name, file.sha256) for file in files),
        PREFIX,
        file_digest(Path(condaprefix.__file__)),
        _rattler_version(),
    ]
    key = hashlib.sha256(canonical_json([LAYER_FORMAT, "conda", epoch, material])).hexdigest()
    comment = f"{PREFIX}: {len(packages)} conda packages"
    layer = store.cached_layer(key)
    if layer is None:
        with tempfile.TemporaryDirectory(prefix="packager-conda-", dir=store.tmp) as tmp:
            staging = Path(tmp) / "prefix"
            installed = condaprefix.install_prefix(
                lock, files, staging, work=Path(tmp) / "rattler-work"
            )
            shutil.rmtree(Path(tmp) / "rattler-work", ignore_errors=True)
            if python is not None:
                _check_interpreter(staging, python)
            log.info("installed %d conda packages for %s", len(installed.packages), PREFIX)
            layer = store.layer(key, comment, entries_from_tree(staging, PREFIX), epoch)
    return CondaPart(layer=layer, prefix=PREFIX, python=python, packages=packages)


def _check_interpreter(staging: Path, python: str) -> None:
    binary = staging / "bin" / f"python{python}"
    if not (binary.is_file() or binary.is_symlink()):
        raise ImageBuildError(
            f"the conda environment's python package installs no bin/python{python}, "
            "so the image has no interpreter to run the model with",
            hint="lock against a channel whose python package is a real interpreter "
            "(conda-forge's or defaults'), or leave python out of conda.yaml",
        )


def _rattler_version() -> str:
    try:
        return version("py-rattler")
    except PackageNotFoundError:  # pragma: no cover - a dependency of packager
        return "unknown"
