"""The conda part of an image: the locked packages installed for their final prefix.

py-rattler's installer links every package of the lock (each archive from the sha256
cache of :mod:`packager.env.condapkgs`, already checked against the lock) into a staging
directory on the build host, and writes the *final* prefix (``/opt/conda``) wherever a
package recorded its build prefix (``info/paths.json``'s placeholders: text files get the
prefix as is, binaries get it padded with NUL bytes to the placeholder's length). The
staging tree is then what the image holds at that prefix; nothing in it may name the
build host.

So after the install this module removes what rattler records about the host: the
package-cache paths in ``conda-meta/*.json`` (``extracted_package_dir``, ``link.source``)
and the ``file://`` URL of the cached archive, replaced by the lock's own URL (no
credentials: the lock has none) and its channel. A last scan (file contents and link
targets) refuses a tree that still contains the staging, work or cache path. (A lock made
against a local ``file://`` channel names that channel's path in its URLs, and so does
``conda-meta``: that is the user's own channel, as recorded in the lock.)

Link scripts never run (they would run on the build host). Records are read from the
archives themselves, so the kind of package (``noarch: python`` goes into the
environment's ``site-packages``) is the package's own, not the lock's summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.env.condalock import CondaLock
from packager.env.condapkgs import CondaFile
from packager.errors import LockError

log = logging.getLogger(__name__)

PREFIX = "/opt/conda"
# What rattler's installer leaves in the prefix that no package owns.
_INSTALLER_LEFTOVERS = ("CACHEDIR.TAG",)


@dataclass(frozen=True, kw_only=True)
class CondaPrefix:
    root: Path  # the staging directory: its tree is ``prefix`` in the image
    prefix: str
    packages: tuple[str, ...]  # name=version=build, in the lock's order
    python: str | None  # X.Y when the environment provides python


def install_prefix(
    lock: CondaLock,
    files: Sequence[CondaFile],
    staging: Path,
    *,
    work: Path,
    prefix: str = PREFIX,
) -> CondaPrefix:
    """Install ``files`` (the lock's packages, from the cache) into ``staging`` for the
    final ``prefix``; ``work`` holds rattler's extracted packages (the caller removes it).
    ``staging`` must not exist yet."""
    import rattler  # noqa: PLC0415 - seconds to import; only conda models need it

    if staging.exists():
        raise LockError(f"the conda staging directory {staging} exists already")
    by_file = {package.file_name: package for package in lock.packages}
    if sorted(file.file_name for file in files) != sorted(by_file):
        raise LockError(
            "the conda packages given are not the lock's: "
            + ", ".join(sorted(set(by_file) ^ {file.file_name for file in files})),
            hint="fetch every package of the lock (fetch_conda_packages) before installing",
        )
    records = asyncio.run(_records(files))
    for record, file in zip(records, files, strict=True):
        locked = by_file.get(file.file_name)
        if locked is None or (record.name.normalized, str(record.version), str(record.build)) != (
            locked.name,
            locked.version,
            locked.build,
        ):
            raise LockError(
                f"{file.file_name} is not the package the lock names "
                f"({record.name.normalized} {record.version} {record.build})",
                hint="lock again: the conda part of the lock and its cached packages differ",
            )
    try:
        asyncio.run(
            rattler.install(
                records,
                staging,
                alternative_target_prefix=prefix,
                cache_dir=work,
                platform=rattler.Platform(lock.platform),
                execute_link_scripts=False,
                show_progress=False,
            )
        )
        _forget_the_host(staging, lock, hosts=(str(staging), str(work), *_cache_dirs(files)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a retry starts from nothing
        raise
    python = lock.python
    return CondaPrefix(
        root=staging,
        prefix=prefix,
        packages=tuple(f"{p.name}={p.version}={p.build}" for p in lock.packages),
        python=".".join(python.split(".")[:2]) if python else None,
    )


async def _records(files: Sequence[CondaFile]) -> list[Any]:
    import rattler  # noqa: PLC0415

    return [await rattler.RepoDataRecord.from_package_archive(file.path) for file in files]


def _cache_dirs(files: Sequence[CondaFile]) -> tuple[str, ...]:
    """The cache directory the archives came from (``…/conda/pkgs/v1/sha256``)."""
    return tuple(sorted({str(file.path.parent.parent) for file in files}))


def _forget_the_host(staging: Path, lock: CondaLock, *, hosts: Sequence[str]) -> None:
    owned: set[str] = set()
    by_file = {package.file_name: package for package in lock.packages}
    for meta in sorted((staging / "conda-meta").glob("*.json")):
        record = json.loads(meta.read_text())
        owned.update(record.get("files", ()))
        package = by_file.get(str(record.get("fn", "")))
        if package is not None:
            record["url"] = package.url
            record["channel"] = package.url.rsplit("/", 2)[0]
        record.pop("extracted_package_dir", None)
        record.pop("package_tarball_full_path", None)
        link = record.get("link")
        if isinstance(link, dict):
            link.pop("source", None)
        meta.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for name in _INSTALLER_LEFTOVERS:
        leftover = staging / name
        if name not in owned and leftover.is_file():
            leftover.unlink()
    needles = [host.encode() for host in hosts if host]
    for path in sorted(staging.rglob("*")):
        if path.is_symlink():
            data = os.fsencode(path.readlink())
        elif path.is_file():
            data = path.read_bytes()
        else:
            continue
        found = next((n for n in needles if n in data), None)
        if found is not None:
            relative = path.relative_to(staging)
            raise LockError(
                f"the conda environment's {relative} names a build-host path "
                f"({found.decode(errors='replace')}); it would ship in the image",
                hint="report this to packager with the package's name",
            )
