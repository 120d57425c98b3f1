"""Content digests of files and directory trees.

A tree's digest covers every regular file's relative POSIX path, size, executable bit and
sha256, in sorted order, so it is independent of the host, the walk order and mtimes. The
same digest names a model in the cache and in provenance, and later stages reuse the
per-file hashes instead of reading large weights twice.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One regular file in a tree."""

    path: str  # relative, POSIX separators
    size: int
    sha256: str
    executable: bool = False


def hash_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def walk_files(root: Path) -> list[Path]:
    """Regular files below ``root`` (following no symlinked directories), sorted."""
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(directory) / name
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def manifest(root: Path) -> tuple[FileEntry, ...]:
    """Hash every regular file below ``root``."""
    entries = []
    for path in walk_files(root):
        info = path.stat()
        entries.append(
            FileEntry(
                path=path.relative_to(root).as_posix(),
                size=info.st_size,
                sha256=hash_file(path),
                executable=bool(info.st_mode & stat.S_IXUSR),
            )
        )
    return tuple(entries)


def tree_digest(entries: Iterable[FileEntry]) -> str:
    """``sha256:<hex>`` over the sorted entries."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        line = f"{entry.path}\0{entry.size}\0{int(entry.executable)}\0{entry.sha256}\n"
        digest.update(line.encode())
    return f"sha256:{digest.hexdigest()}"


def subtree(entries: Iterable[FileEntry], prefix: str) -> tuple[FileEntry, ...]:
    """Entries at ``prefix`` (a file) or below it (a directory), paths kept as they are."""
    prefix = prefix.strip("/")
    return tuple(e for e in entries if e.path == prefix or e.path.startswith(prefix + "/"))
