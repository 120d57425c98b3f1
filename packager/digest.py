"""Content digests of files and directory trees.

A tree's digest covers every regular file's relative POSIX path, size, executable bit and
sha256, in sorted order, so it is independent of the host, the walk order and mtimes. The
same digest names a model in the cache and in provenance, and later stages reuse the
per-file hashes instead of reading large weights twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager.errors import ModelFormatError

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One regular file in a tree."""

    path: str  # relative, POSIX separators
    size: int
    sha256: str
    executable: bool = False
    # Readable by "others" in the source. The image's server user is "other" to every
    # file (they are root's), so this is what decides whether it may read it there.
    public: bool = True


def hash_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


LinkPolicy = Literal["error", "skip"]


def walk_files(root: Path, *, outside_links: LinkPolicy = "error") -> list[Path]:
    """Regular files below ``root``, sorted by relative path: the one place that decides
    what belongs to a model, whichever way it arrived (local directory, download, cache).

    A symbolic link that stays inside ``root`` is resolved: a link to a file is that file
    under the link's name, a link to a directory is walked under the link's name (a cycle
    is an error). A link that leaves ``root``, or points nowhere, would ship a file from
    outside the model (``ln -s /etc/shadow``) into an image: it is a
    :class:`~packager.errors.ModelFormatError` naming the link, or with
    ``outside_links="skip"`` it is left out with a warning. Anything that is neither a
    file, a directory nor a link (a FIFO, a socket, a device) is an error too: reading
    it could block or read the host.
    """
    top = Path(os.path.realpath(root))
    found: list[Path] = []
    _walk(root, root, top=top, found=found, outside_links=outside_links, active=(top,))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _walk(
    root: Path,
    directory: Path,
    *,
    top: Path,
    found: list[Path],
    outside_links: LinkPolicy,
    active: tuple[Path, ...],
) -> None:
    try:
        children = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as err:
        raise ModelFormatError(f"cannot list {directory}: {err.strerror}") from err
    for path in children:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = Path(os.path.realpath(path))  # never raises, even for a loop
            relative = path.relative_to(root).as_posix()
            if not target.is_relative_to(top) or not target.exists():
                where = "points nowhere" if not target.exists() else "points outside the model"
                if outside_links == "skip":
                    log.warning("skipping %s: a symbolic link that %s", relative, where)
                    continue
                raise ModelFormatError(
                    f"{relative} in {root} is a symbolic link that {where} "
                    f"({path.readlink()}); packager ships only the model's own files",
                    hint="copy the file into the model directory, remove the link, or pass "
                    "--skip-outside-links to leave such links out",
                )
            if target.is_dir():
                if target in active:
                    raise ModelFormatError(
                        f"{relative} in {root} is a symbolic link to a directory that "
                        "contains it (a cycle)",
                        hint="remove the link",
                    )
                _walk(
                    root,
                    path,
                    top=top,
                    found=found,
                    outside_links=outside_links,
                    active=(*active, target),
                )
            elif target.is_file():
                found.append(path)
            else:
                raise _not_a_file(relative, root)
        elif stat.S_ISDIR(info.st_mode):
            inside = (*active, Path(os.path.realpath(path)))
            _walk(root, path, top=top, found=found, outside_links=outside_links, active=inside)
        elif stat.S_ISREG(info.st_mode):
            found.append(path)
        else:
            raise _not_a_file(path.relative_to(root).as_posix(), root)


def _not_a_file(relative: str, root: Path) -> ModelFormatError:
    return ModelFormatError(
        f"{relative} in {root} is not a regular file (a FIFO, socket or device)",
        hint="remove it from the model directory",
    )


def manifest(root: Path, *, outside_links: LinkPolicy = "error") -> tuple[FileEntry, ...]:
    """Hash every file below ``root`` (see :func:`walk_files` for what counts as one)."""
    entries = []
    for path in walk_files(root, outside_links=outside_links):
        info = path.stat()
        entries.append(
            FileEntry(
                path=path.relative_to(root).as_posix(),
                size=info.st_size,
                sha256=hash_file(path),
                executable=bool(info.st_mode & stat.S_IXUSR),
                public=bool(info.st_mode & stat.S_IROTH),
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
