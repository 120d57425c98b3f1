"""Run the base image's own interpreter with no container engine (OCI backend).

Bytecode has to be written by the interpreter that will read it: two patch releases of one
Python compile some modules differently, so pycs made by the build machine's Python would
make the OCI backend's image differ from the Docker backend's (which compiles inside the
build). The daemonless backend therefore unpacks the base image's layers into a root file
system, once per base (cached under the blob store, keyed by the layers' diff ids), and
runs the base's interpreter from it through the base's own dynamic loader, with its
libraries and ``PYTHONHOME`` in the unpacked tree: no daemon, no namespace, no privilege.

Unpacking applies the layers in order with OCI whiteouts. Every member goes through
:func:`tarfile.tar_filter` (no absolute paths, nothing that resolves outside the root,
no setuid bits); device nodes and FIFOs are skipped (nothing here needs them).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from packager.errors import ImageBuildError

if TYPE_CHECKING:
    from packager.image.bases import Base
    from packager.image.blobs import BlobStore

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# What the interpreter sees: a fixed environment, nothing from the build machine.
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def base_rootfs(base: Base, store: BlobStore) -> Path:
    """The base's root file system, unpacked once (atomically: a killed unpack leaves only
    a temporary directory, never a half tree under the final name)."""
    key = hashlib.sha256(json.dumps([layer.diff_id for layer in base.layers]).encode())
    target = store.root / "rootfs" / key.hexdigest()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="rootfs-", dir=store.tmp))
    try:
        for layer in base.layers:
            apply_layer(store.path(layer.digest), partial)
        try:
            partial.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent unpack of the same base
                raise
    finally:
        if partial.exists():
            _remove(partial)
    return target


def apply_layer(layer: Path, root: Path) -> int:
    """Unpack one layer tar (plain or gzip) onto ``root``; returns how many members were
    skipped (devices, FIFOs, and anything the filter refuses)."""
    if not hasattr(tarfile, "tar_filter"):
        raise ImageBuildError(
            "unpacking the base safely needs Python >= 3.10.12 or >= 3.11.4 (tarfile filters)",
            hint="upgrade Python, or build with --no-bytecode",
        )
    skipped = 0

    def keep(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        nonlocal skipped
        if member.isdev() or member.isfifo():
            skipped += 1
            return None
        try:
            kept = tarfile.tar_filter(member, destination)
        except tarfile.FilterError:
            skipped += 1
            return None
        if not kept.isdir():  # replace, never write through, what a lower layer put there
            _unlink_inside(root, _relative(kept.name))
        return kept

    with tarfile.open(layer) as archive:
        members = archive.getmembers()
        regular = []
        for member in members:
            name = _relative(member.name)
            if name is None:
                skipped += 1
                continue
            folder, base = posixpath.split(name)
            if base == OPAQUE:
                _clear_inside(root, folder)
            elif base.startswith(WHITEOUT):
                _unlink_inside(root, posixpath.join(folder, base[len(WHITEOUT) :]))
            else:
                regular.append(member)
        archive.extractall(root, members=regular, filter=keep)  # noqa: S202 - filtered
    return skipped


def _relative(name: str | None) -> str | None:
    if not name:
        return None
    normal = posixpath.normpath(name.lstrip("/"))
    if normal in (".", "") or normal == ".." or normal.startswith("../"):
        return None
    return normal


def _inside(root: Path, relative: str | None) -> Path | None:
    """``root/relative`` if no component before the last is a symlink (a symlink there
    could point anywhere on this machine), else None."""
    if relative is None:
        return None
    path = root
    parts = relative.split("/")
    for part in parts[:-1]:
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path / parts[-1]


def _unlink_inside(root: Path, relative: str | None) -> None:
    path = _inside(root, relative)
    if path is None or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        _remove(path)
    else:
        path.unlink()


def _clear_inside(root: Path, relative: str) -> None:
    folder = root if relative in ("", ".") else _inside(root, relative)
    if folder is None or folder.is_symlink() or not folder.is_dir():
        return
    for child in folder.iterdir():
        _unlink_inside(root, str(child.relative_to(root)))


def _remove(path: Path) -> None:
    """rmtree that also removes what a base made read-only (when not running as root)."""

    def retry(function: Callable[[str], object], name: str, _: object) -> None:
        for folder in (Path(name).parent, Path(name)):
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o700)
        function(name)

    shutil.rmtree(path, onerror=retry)


_MAX_LINK_HOPS = 40
_PT_INTERP = 3


def resolve_inside(rootfs: Path, path: str) -> Path:
    """``path`` of the base's file system as a path under ``rootfs``, following its symbolic
    links the way the base's own kernel view would (absolute targets start at ``rootfs``);
    a chain that leaves ``rootfs`` or loops is an error."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = rootfs.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise ImageBuildError(f"{path} in the base image: too many symbolic links")
            target = str(candidate.readlink())
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return rootfs.joinpath(*resolved)


def elf_interpreter(binary: Path) -> str | None:
    """The program interpreter (``PT_INTERP``: the dynamic loader) an ELF file names, or
    None for a static or non-ELF file."""
    with binary.open("rb") as handle:
        head = handle.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        wide = head[4] == 2
        order: Literal["little", "big"] = "little" if head[5] == 1 else "big"

        def number(data: bytes, offset: int, size: int) -> int:
            return int.from_bytes(data[offset : offset + size], order)

        if wide:
            phoff, phentsize, phnum = number(head, 32, 8), number(head, 54, 2), number(head, 56, 2)
        else:
            phoff, phentsize, phnum = number(head, 28, 4), number(head, 42, 2), number(head, 44, 2)
        for index in range(phnum):
            handle.seek(phoff + index * phentsize)
            entry = handle.read(phentsize)
            if number(entry, 0, 4) != _PT_INTERP:
                continue
            offset, size = (
                (number(entry, 8, 8), number(entry, 32, 8))
                if wide
                else (
                    number(entry, 4, 4),
                    number(entry, 16, 4),
                )
            )
            handle.seek(offset)
            return handle.read(size).rstrip(b"\0").decode()
    return None


def library_dirs(rootfs: Path) -> list[str]:
    """The base's library search path, as its ``ld.so.conf`` (with includes) and the
    loader's defaults give it, as base paths."""
    found: list[str] = []

    def read(conf: Path, depth: int) -> None:
        try:
            lines = conf.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if line.startswith("include") and depth < 4:
                pattern = line.split(None, 1)[1] if " " in line else ""
                for match in sorted(rootfs.glob(pattern.lstrip("/"))):
                    read(match, depth + 1)
            elif line.startswith("/") and line not in found:
                found.append(line)

    read(rootfs / "etc" / "ld.so.conf", 0)
    for default in ("/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        if default not in found:
            found.append(default)
    return found


def interpreter_command(rootfs: Path, interpreter: str, *, what: str) -> list[str]:
    """The command that runs the base's ``interpreter`` on this machine, with no container
    engine and no namespace: the base's own dynamic loader, its own libraries, and its own
    standard library (``PYTHONHOME``, in :func:`interpreter_environment`). Every byte of code
    that runs is the base's, so the bytecode is what the base's Python writes in a build,
    and it works where user namespaces are forbidden (Ubuntu 24.04 runners, Kubernetes pods
    under the default seccomp profile). Checked once, so a base whose Python cannot run here
    (another CPU architecture) gets a clear error instead of a failure deep in a build."""
    python = resolve_inside(rootfs, interpreter)
    if not python.is_file():
        raise ImageBuildError(f"{what}: the base image has no {interpreter}")
    loader_path = elf_interpreter(python)
    if loader_path is None:
        raise ImageBuildError(
            f"{what}: {interpreter} in the base image is not a dynamically linked ELF program",
            hint="use a Debian- or python:-based image, or build with --no-bytecode",
        )
    loader = resolve_inside(rootfs, loader_path)
    libraries = ":".join(
        dict.fromkeys(str(resolve_inside(rootfs, d)) for d in library_dirs(rootfs))
    )
    command = [str(loader), "--library-path", libraries, str(python)]
    result = subprocess.run(
        [*command, "-c", "import encodings, compileall, py_compile"],
        env=interpreter_environment(rootfs, interpreter),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"{what}: cannot run the base image's {interpreter} here: "
            f"{(result.stderr or result.stdout).strip()[-500:]}",
            hint="a base for another CPU architecture needs that machine (or qemu binfmt); "
            "use --backend docker, or build with --no-bytecode",
        )
    return command


def interpreter_environment(rootfs: Path, interpreter: str) -> dict[str, str]:
    """:data:`ENVIRONMENT`, with ``PYTHONHOME`` at the interpreter's prefix in ``rootfs``
    (``/usr`` for ``/usr/bin/python3.11``, ``/usr/local`` for ``/usr/local/bin/…``)."""
    prefix = posixpath.dirname(posixpath.dirname(interpreter))
    return {**ENVIRONMENT, "PYTHONHOME": str(resolve_inside(rootfs, prefix))}
