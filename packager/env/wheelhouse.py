"""Every locked distribution, as a wheel for the image's platform, verified and cached.

The image installs only from the wheelhouse (``pip install --no-index --find-links``), so
its build needs no network. Wheels are cached under ``<cache>/wheels/v1/sha256/<hex>/``,
shared by every model: a wheel is fetched once. Nothing unverified is ever cached: files
are downloaded into a temporary directory, hashed, checked against the lock, and only
then moved in.

Downloading for another platform uses ``pip download --only-binary=:all:`` with the
target's platform tags, Python version and ABIs. A package with no wheel for the target is
built into one when this interpreter matches the target; otherwise the error names the
package and the platform.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from packager.digest import hash_file
from packager.env.inputs import LockInputs
from packager.env.lock import Lock, LockedPackage
from packager.env.target import Target
from packager.errors import CommandFailedError, HashMismatchError, NoWheelError
from packager.runner import run

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WheelFile:
    name: str
    version: str
    filename: str
    sha256: str
    path: Path
    built_here: bool = False  # built from its (hash-checked) sdist on this machine


@dataclass(frozen=True, kw_only=True)
class Wheelhouse:
    files: tuple[WheelFile, ...]
    downloaded: int  # how many were fetched (the rest came from the cache)

    def link_into(self, directory: Path) -> None:
        """Put every wheel into ``directory`` (hard links where possible)."""
        directory.mkdir(parents=True, exist_ok=True)
        for wheel in self.files:
            destination = directory / wheel.filename
            if destination.exists():
                continue
            try:
                destination.hardlink_to(wheel.path)
            except OSError:
                shutil.copy2(wheel.path, destination)


class WheelStore:
    def __init__(self, cache_root: Path) -> None:
        self.root = cache_root / "wheels" / "v1" / "sha256"

    def find(self, package: LockedPackage, target: Target) -> Path | None:
        """A cached wheel of this package for ``target``.

        A lock lists the hashes of every file of a version, all platforms together, so a
        matching hash alone is not enough: the wheel's tags must suit the target too.
        """
        for digest in package.hashes:
            folder = self.root / digest.removeprefix("sha256:")
            for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else ():
                if target.accepts_wheel(wheel.name):
                    return wheel
        return None

    def add(self, file: Path, sha256: str) -> Path:
        return next(store_by_sha256(self.root, file, sha256).glob("*.whl"))


def store_by_sha256(root: Path, file: Path, sha256: str) -> Path:
    """Copy ``file`` (already verified against ``sha256``) into ``root/<sha256>/``, whole or
    not at all: staged beside it and renamed into place, so a crash or a concurrent run never
    leaves a half-written entry. Returns the entry's folder. Wheels and conda packages share it.
    """
    folder = root / sha256
    if not folder.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        shutil.copy2(file, staging / file.name)
        try:
            staging.rename(folder)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another run got there first
    return folder


def build_wheelhouse(lock: Lock, inputs: LockInputs, *, cache_root: Path) -> Wheelhouse:
    store = WheelStore(cache_root)
    found: dict[str, Path] = {}
    missing: list[LockedPackage] = []
    for package in lock.packages:
        path = store.find(package, lock.target)
        if path is not None:
            found[package.name] = path
        else:
            missing.append(package)
    built: set[str] = set()
    if missing:
        log.info(
            "downloading %d of %d wheels for %s",
            len(missing),
            len(lock.packages),
            lock.target.describe(),
        )
        with tempfile.TemporaryDirectory(prefix="packager-wheels-") as tmp:
            work = Path(tmp)
            downloaded, built = _fetch(missing, inputs, lock, work)
            by_name = {p.name: p for p in missing}
            for file in downloaded:
                name, version = _name_version(file)
                wanted = by_name.get(name)
                if wanted is None or wanted.version != version:
                    continue
                digest = hash_file(file)
                if name not in built and f"sha256:{digest}" not in wanted.hashes:
                    raise HashMismatchError(
                        f"{file.name}: sha256 {digest} is not one of the lock's hashes for "
                        f"{name}=={version}; nothing was cached",
                        hint="the index served a different file than when the lock was made; "
                        "check the index, or re-lock if the change is expected",
                    )
                found[name] = store.add(file, digest)
    files = []
    for package in lock.packages:
        path = found.get(package.name)
        if path is None:
            raise NoWheelError(
                f"{package.name}=={package.version}: no wheel was obtained for "
                f"{lock.target.describe()}"
            )
        files.append(
            WheelFile(
                name=package.name,
                version=package.version,
                filename=path.name,
                sha256=path.parent.name,
                path=path,
                built_here=package.name in built,
            )
        )
    return Wheelhouse(files=tuple(files), downloaded=len(missing))


def _fetch(
    packages: list[LockedPackage], inputs: LockInputs, lock: Lock, work: Path
) -> tuple[list[Path], set[str]]:
    """Download wheels for the target; build the ones that have none, if we can."""
    pending = list(packages)
    built: set[str] = set()
    for _ in range(len(packages) + 1):
        if not pending:
            break
        try:
            _download(pending, inputs, lock, work)
            pending = []
        except CommandFailedError as err:
            if "DO NOT MATCH THE HASHES" in err.output:
                raise HashMismatchError(
                    "a downloaded wheel does not match the lock's hashes; nothing was "
                    f"cached:\n{err.output[-2000:]}",
                    hint="the index now serves a different file than when the lock was made; "
                    "check the index, or re-lock if the change is expected",
                ) from err
            name = _missing_package(err.output)
            found = next((p for p in pending if p.name == name), None)
            if found is None:
                raise
            stuck = found
            if not lock.target.matches_host():
                raise NoWheelError(
                    f"{stuck.name}=={stuck.version} has no wheel for "
                    f"{lock.target.describe()}, and this machine can't build one for it",
                    hint=f"build the wheel on {lock.target.platform} with Python "
                    f"{lock.target.python} and pass its directory with --wheel-dir",
                ) from err
            _build(stuck, inputs, work)
            built.add(stuck.name)
            pending = [p for p in pending if p.name != stuck.name]
    return sorted(work.glob("*.whl")), built


def _requirements_file(packages: list[LockedPackage], work: Path) -> Path:
    path = work / "wanted.txt"
    path.write_text(
        "".join(
            f"{p.name}=={p.version} " + " ".join(f"--hash={h}" for h in p.hashes) + "\n"
            for p in packages
        )
    )
    return path


def _download(packages: list[LockedPackage], inputs: LockInputs, lock: Lock, work: Path) -> None:
    target = lock.target
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(work),
        "--python-version",
        target.python,
        "--implementation",
        "cp",
        "--abi",
        target.cpython_tag,
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-r",
        str(_requirements_file(packages, work)),
    ]
    for platform_tag in target.pip_platforms:
        argv += ["--platform", platform_tag]
    for directory in inputs.find_links:
        argv += ["--find-links", str(directory)]
    if inputs.no_index:
        argv.append("--no-index")
    run(argv, what=f"downloading wheels for {target.describe()}", secret_env=inputs.secret_env)


def _build(package: LockedPackage, inputs: LockInputs, work: Path) -> None:
    log.info("%s==%s has no wheel for the target; building it here", package.name, package.version)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        "--wheel-dir",
        str(work),
        "-r",
        str(_requirements_file([package], work)),
    ]
    for directory in inputs.find_links:
        argv += ["--find-links", str(directory)]
    run(argv, what=f"building a wheel for {package.name}", secret_env=inputs.secret_env)


def _missing_package(output: str) -> str | None:
    match = re.search(
        r"(?:No matching distribution found for|satisfies the requirement) "
        r"([A-Za-z0-9._-]+)",
        output,
    )
    return str(canonicalize_name(match.group(1))) if match else None


def _name_version(file: Path) -> tuple[str, str]:
    try:
        name, version, _, _ = parse_wheel_filename(file.name)
    except InvalidWheelFilename:
        return "", ""
    return str(name), str(version)
