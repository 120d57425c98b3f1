"""Run the base image's own interpreter with no container engine (OCI backend).

Bytecode has to be written by the interpreter that will read it: two patch releases of one
Python compile some modules differently, so pycs made by the build machine's Python would
make the OCI backend's image differ from the Docker backend's (which compiles inside the
build). The daemonless backend therefore unpacks the base image's layers into a root file
system, once per base (cached under the blob store, keyed by the layers' diff ids), and
runs the base's interpreter in it with ``unshare --map-root-user --root``: a new user
namespace, no daemon, no privileges beyond unprivileged user namespaces.

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
from typing import TYPE_CHECKING

from packager.errors import ImageBuildError

if TYPE_CHECKING:
    from packager.image.oci import Base, BlobStore

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


def command_in(rootfs: Path, *, what: str) -> list[str]:
    """The command prefix that runs a program with ``rootfs`` as its root, as root of a
    new user namespace; checked once, so a machine without user namespaces gets a clear
    error instead of a failure deep in a build."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise ImageBuildError(
            f"{what} needs unshare (util-linux) to run the base image's Python",
            hint="install util-linux, use --backend docker, or build with --no-bytecode",
        )
    prefix = [unshare, "--map-root-user", f"--root={rootfs}"]
    result = subprocess.run(
        [*prefix, "/bin/sh", "-c", "exit 0"],
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"{what}: cannot run programs of the base image here: "
            f"{(result.stderr or result.stdout).strip()[-500:]}",
            hint="unprivileged user namespaces may be disabled (sysctl "
            "kernel.unprivileged_userns_clone, or an AppArmor policy); use --backend docker, "
            "or build with --no-bytecode",
        )
    return prefix
