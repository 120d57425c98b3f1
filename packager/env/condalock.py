"""The conda part of a lock: what was solved, written and read as a conda-lock file.

Where it lives: *inside* the packager lock, after the pip part, as ``#| ``-prefixed lines
(``Lock.render``). One file, because everything that handles a lock already carries one
file: ``-o FILE`` and ``--lock FILE``, the lock cache, the build context's
``requirements.lock``, and the ``io.packager.lock.digest`` label, whose digest then covers
both parts with no second file to keep in step. pip still reads the file (``#`` lines are
comments), and a pip-only lock is byte for byte what it was. The block is a conda-lock
v1 file as conda-lock's own models write it, so ``packager lock --conda-lock FILE`` (or
stripping the ``#| `` prefix) gives a file that ``conda-lock install`` and conda-lock's
parser read as is.

conda-lock is imported only here and only when a lock has a conda part: importing it
takes seconds (pydantic models, vendored conda).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from packager.errors import LockError
from packager.redact import redact_uri

BLOCK_PREFIX = "#| "
BLOCK_MARKER = "# conda-lock v1: the conda packages (`packager lock --conda-lock FILE` writes them)"
SOURCE = "conda.yaml"


@dataclass(frozen=True, kw_only=True)
class CondaPackage:
    """One locked conda package: enough to fetch it, check it and install it."""

    name: str
    version: str
    build: str
    subdir: str  # the package's own subdir: the target's, or "noarch"
    url: str  # without credentials
    sha256: str  # hex
    md5: str  # hex; conda-lock requires it
    depends: tuple[str, ...] = ()

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True, kw_only=True)
class CondaLock:
    platform: str  # conda subdir: linux-64, linux-aarch64
    channels: tuple[str, ...]  # without credentials
    specs: tuple[str, ...]  # what was asked for (conda.yaml's packages, python)
    packages: tuple[CondaPackage, ...]  # sorted by name

    @property
    def python(self) -> str | None:
        """The Python the conda environment provides, if it has one."""
        return next((p.version for p in self.packages if p.name == "python"), None)

    def get(self, name: str) -> CondaPackage | None:
        return next((p for p in self.packages if p.name == name), None)

    @property
    def content_hash(self) -> str:
        """conda-lock's per-platform input hash: the request, not the solution."""
        data = {"platform": self.platform, "channels": self.channels, "specs": self.specs}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @functools.cached_property
    def text(self) -> str:
        """The conda-lock v1 YAML, written by conda-lock's own writer (no help text, no
        time or git metadata, so the same solution gives the same bytes)."""
        from conda_lock.lockfile import (  # type: ignore[import-untyped]  # noqa: PLC0415
            write_conda_lock_file,  # slow to import
        )

        lockfile = _to_model(self)
        with tempfile.TemporaryDirectory(prefix="packager-conda-lock-") as tmp:
            path = Path(tmp) / "conda-lock.yml"
            write_conda_lock_file(lockfile, path, metadata_choices=None, include_help_text=False)
            return path.read_text(encoding="utf-8")

    def render_block(self) -> list[str]:
        """The lines this part adds to a packager lock."""
        return [BLOCK_MARKER] + [(BLOCK_PREFIX + line).rstrip() for line in self.text.splitlines()]


def _to_model(lock: CondaLock) -> Any:
    from conda_lock.lockfile.v2prelim.models import (  # type: ignore[import-untyped]  # noqa: PLC0415
        HashModel,
        LockedDependency,
        Lockfile,
        LockMeta,
    )

    return Lockfile(
        package=[
            LockedDependency(
                name=p.name,
                version=p.version,
                manager="conda",
                platform=lock.platform,
                dependencies=_dependencies(p.depends),
                url=redact_uri(p.url),
                hash=HashModel(md5=p.md5, sha256=p.sha256),
                build=p.build,
                categories={"main"},
            )
            for p in lock.packages
        ],
        metadata=LockMeta(
            content_hash={lock.platform: lock.content_hash},
            channels=[redact_uri(c) for c in lock.channels],
            platforms=[lock.platform],
            sources=[SOURCE],
            # conda-lock has no field for the request itself; kept so a lock read back can
            # be checked against the model (`--lock FILE`) and re-rendered identically.
            custom_metadata={"packager_specs": json.dumps(list(lock.specs))},
        ),
    )


def normalize_depends(depends: Sequence[str]) -> tuple[str, ...]:
    """A record's ``depends`` as a lock keeps them: one entry per name, sorted, as
    conda-lock's ``{name: spec}`` mapping writes and reads them back."""
    return tuple(f"{name} {spec}".strip() for name, spec in sorted(_dependencies(depends).items()))


def _dependencies(depends: Sequence[str]) -> dict[str, str]:
    """conda-lock's ``{name: spec}`` form of a record's ``depends`` (virtual packages too,
    as conda-lock itself writes them)."""
    found: dict[str, str] = {}
    for depend in depends:
        name, _, rest = depend.strip().partition(" ")
        found[name] = ",".join(filter(None, [found.get(name, ""), rest.strip()]))
    return found


def parse_block(lines: list[str], *, source: str = "lock") -> CondaLock | None:
    """The conda part of a packager lock's lines, if it has one."""
    body = [line[len(BLOCK_PREFIX) :] for line in lines if line.startswith("#|")]
    if not body:
        return None
    return parse_conda_lock("\n".join(body) + "\n", source=source)


def parse_conda_lock(text: str, *, source: str = "conda-lock.yml") -> CondaLock:
    """A conda-lock v1 or v2 file (one platform, conda packages only), validated by
    conda-lock's own models."""
    from conda_lock.lockfile.v1.models import (  # type: ignore[import-untyped]  # noqa: PLC0415
        Lockfile as LockfileV1,
    )
    from conda_lock.lockfile.v2prelim.models import (  # noqa: PLC0415
        Lockfile,
        lockfile_v1_to_v2,
    )
    from pydantic import ValidationError  # noqa: PLC0415

    try:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise LockError(f"{source}: the conda part is not a conda-lock file")
        version = data.pop("version", None)
        if version == 1:
            model = lockfile_v1_to_v2(LockfileV1.model_validate(data))
        elif version == 2:
            model = Lockfile.model_validate(data)
        else:
            raise LockError(f"{source}: conda-lock version {version!r} is not 1 or 2")
    except (yaml.YAMLError, ValidationError) as err:
        raise LockError(f"{source}: the conda part is not a valid conda-lock file: {err}") from err
    platforms = list(model.metadata.platforms)
    if len(platforms) != 1:
        raise LockError(
            f"{source}: the conda part locks {len(platforms)} platforms ({', '.join(platforms)}); "
            "a packager lock is for one image platform",
            hint="make one with `packager lock MODEL --platform ...`",
        )
    custom = model.metadata.custom_metadata or {}
    specs = json.loads(custom.get("packager_specs", "[]"))
    packages = []
    for dep in model.package:
        if dep.manager != "conda":
            raise LockError(
                f"{source}: {dep.name} is a {dep.manager} package; the pip part of a packager "
                "lock is outside the conda-lock block"
            )
        if not dep.hash.sha256:
            raise LockError(f"{source}: the conda package {dep.name} has no sha256")
        packages.append(
            CondaPackage(
                name=dep.name,
                version=dep.version,
                build=dep.build or "",
                subdir=dep.url.rsplit("/", 2)[-2] if dep.url.count("/") >= 2 else platforms[0],
                url=dep.url,
                sha256=dep.hash.sha256,
                md5=dep.hash.md5 or "",
                depends=tuple(f"{k} {v}".strip() for k, v in dep.dependencies.items()),
            )
        )
    return CondaLock(
        platform=platforms[0],
        channels=tuple(c.url for c in model.metadata.channels),
        specs=tuple(str(s) for s in specs),
        packages=tuple(sorted(packages, key=lambda p: p.name)),
    )
