"""Deterministic image layers: the same files give the same tar bytes on any machine.

A layer is an uncompressed tar. Everything that could vary with the machine or the
moment is fixed: entries sorted by path, every parent directory present, owner root:root
with empty user and group names, mtime the build's epoch (from the inputs, never the
clock), modes normalized (0755 for directories and anything executable, 0644 otherwise:
the umask does not leak), no device numbers, hard links stored as files. Layers stay
uncompressed on purpose: gzip output depends on the zlib build (zlib-ng and zlib differ),
which would make the digest depend on the machine; registries and engines accept tar
layers as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One file system entry of a layer, by its absolute path in the image."""

    path: str  # absolute, e.g. /opt/model/MLmodel
    source: Path | None = None  # a regular file to read
    content: bytes | None = None
    symlink: str | None = None
    directory: bool = False
    executable: bool = False
    private: bool = False  # 0600/0700: readable only by root, the owner


@dataclass(frozen=True, kw_only=True)
class Layer:
    digest: str  # sha256:<hex> of the tar (== diff_id: uncompressed)
    size: int
    path: Path  # the blob on disk
    comment: str  # what the layer holds, for the image history


def entries_from_tree(root: Path, image_path: str) -> list[Entry]:
    """Every file, link and directory under ``root``, placed at ``image_path``."""
    found: list[Entry] = [Entry(path=image_path, directory=True)]
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder)
        for name in [*dirs, *sorted(files)]:
            path = base / name
            where = f"{image_path.rstrip('/')}/{path.relative_to(root).as_posix()}"
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found.append(Entry(path=where, symlink=str(path.readlink())))
            elif stat.S_ISDIR(info.st_mode):
                found.append(Entry(path=where, directory=True))
            elif stat.S_ISREG(info.st_mode):
                found.append(Entry(path=where, source=path, executable=bool(info.st_mode & 0o111)))
    return found


def _parents(path: str) -> Iterator[str]:
    parts = PurePosixPath(path).parts[1:-1]
    for i in range(1, len(parts) + 1):
        yield "/" + "/".join(parts[:i])


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    by_path: dict[str, Entry] = {}
    for entry in entries:
        for parent in _parents(entry.path):
            by_path.setdefault(parent, Entry(path=parent, directory=True))
        by_path[entry.path.rstrip("/") or "/"] = entry
    by_path.pop("/", None)
    return [by_path[p] for p in sorted(by_path)]


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, sink: io.BufferedWriter) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def write_layer(entries: Iterable[Entry], destination: Path, *, epoch: int, comment: str) -> Layer:
    """Write the tar to ``destination`` (created atomically) and return its digest."""
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as raw:
            hashing = _Hashing(raw)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for entry in _with_parents(entries):
                    _add(tar, entry, epoch)
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(
        digest="sha256:" + hashing.digest.hexdigest(),
        size=hashing.size,
        path=destination,
        comment=comment,
    )


def _add(tar: tarfile.TarFile, entry: Entry, epoch: int) -> None:
    info = tarfile.TarInfo(entry.path.lstrip("/"))
    info.mtime = epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    elif entry.symlink is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.symlink
        info.mode = 0o777
        tar.addfile(info)
    elif entry.content is not None:
        info.size = len(entry.content)
        info.mode = _file_mode(entry)
        tar.addfile(info, io.BytesIO(entry.content))
    elif entry.source is not None:
        info.size = entry.source.stat().st_size
        info.mode = _file_mode(entry)
        with entry.source.open("rb") as stream:
            tar.addfile(info, stream)
    else:  # pragma: no cover - Entry is always one of the above
        raise ValueError(f"empty layer entry {entry.path}")


def _file_mode(entry: Entry) -> int:
    if entry.private:
        return 0o700 if entry.executable else 0o600
    return 0o755 if entry.executable else 0o644


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
