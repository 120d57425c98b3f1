"""Install a locked wheelhouse into a virtualenv tree, the same way on any machine.

Both image backends use this one installer, so their ``/opt/venv`` trees are identical:
the Docker backend runs it inside the build (with the base image's Python, from the
context's ``tools/``), the OCI backend runs it on the build machine into a staging
directory. It imports only the standard library and pypa's ``installer`` (the reference
implementation of the wheel spec, pure Python, no dependencies), so it runs from the
build context with no network and no pip.

What it checks, in the spirit of ``pip install --no-index --require-hashes``:

- every wheel in the wheel directory is listed in the manifest with its sha256, and the
  file matches it;
- every manifest entry's hash is one the lock allows for that name and version, unless
  the manifest marks the wheel as built from the lock's (hash-checked) sdist.

The tree it writes does not depend on the interpreter running it, the umask (the image
layer writers normalize modes), or the clock: a fixed ``INSTALLER``, wheels installed in
file name order, and a ``pyvenv.cfg`` that names only the Python version.

Bytecode (``--compile``, or ``--compile-only`` on an installed tree) is a separate pass
that must run on the image's own interpreter: ``.pyc`` files differ between patch
releases of one Python (3.11.2 and 3.11.7 compile a few dozen of ~8,000 modules
differently). They are ``unchecked-hash`` pycs: no source mtime inside (reproducible),
and never re-validated against the source at import (the image is read-only to the
server anyway). Test directories are skipped: the server never imports them, and they
are a third of the bytecode's size. Files that don't compile are left without bytecode,
as pip does.

``--prune-tests`` removes the ``tests`` directories inside installed packages (pandas,
scipy, pyarrow, scikit-learn... ship ~50 MB of them). Only directories named exactly
``tests`` below a top-level package go: ``test`` and ``testing`` are often public API
(``graphene.test``, ``numpy.testing``), and a top-level ``tests`` package is left alone.
The packages' RECORD files still list the removed files; nothing reads them at run time.

Manifest format (``wheelhouse.txt``), one wheel per line::

    <sha256 hex> <name> <version> <filename> [built]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

INSTALLER_NAME = b"packager"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class InstallError(Exception):
    """A wheelhouse that does not match its manifest or lock."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_hashes(lock_text: str) -> dict[tuple[str, str], set[str]]:
    """(canonical name, version) -> allowed sha256 hex digests, from a pip hash lock."""
    allowed: dict[tuple[str, str], set[str]] = {}
    current: tuple[str, str] | None = None
    for raw in lock_text.splitlines():
        line = raw.strip()
        match = _PIN.match(line)
        if match:  # hashes follow their pin, on continuation lines
            current = (canonical(match.group(1)), match.group(2))
            allowed.setdefault(current, set())
        if current is not None:
            allowed[current].update(_HASH.findall(line))
    return allowed


def read_manifest(text: str) -> list[tuple[str, str, str, str, bool]]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        parts = raw.split()
        if len(parts) not in (4, 5) or len(parts[0]) != 64:
            raise InstallError(f"wheelhouse manifest line {number} is malformed: {raw!r}")
        entries.append((parts[0], canonical(parts[1]), parts[2], parts[3], len(parts) == 5))
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_wheelhouse(wheels: Path, manifest: Path, lock: Path) -> list[Path]:
    """The wheels to install, in install order, after every check passed."""
    entries = read_manifest(manifest.read_text(encoding="utf-8"))
    allowed = lock_hashes(lock.read_text(encoding="utf-8"))
    listed = {filename for _, _, _, filename, _ in entries}
    present = {p.name for p in wheels.glob("*.whl")}
    if present - listed:
        raise InstallError(f"wheels not in the manifest: {', '.join(sorted(present - listed))}")
    if listed - present:
        raise InstallError(f"wheels missing: {', '.join(sorted(listed - present))}")
    for sha256, name, version, filename, built in entries:
        if not built and sha256 not in allowed.get((name, version), set()):
            raise InstallError(f"{filename}: its hash is not one the lock allows for {name}")
        if _sha256(wheels / filename) != sha256:
            raise InstallError(f"{filename}: the file does not match its sha256 {sha256}")
    return [wheels / filename for filename in sorted(listed)]


def write_skeleton(
    venv_root: Path, python: str, base_python: str, *, system_site_packages: bool = False
) -> None:
    """pyvenv.cfg, bin/python links and an empty site-packages, like ``python -m venv``.
    ``system_site_packages``: the base interpreter's own site-packages stay visible, after
    the venv's (a conda environment's Python, whose conda packages live there)."""
    site = site_packages(venv_root, python)
    site.mkdir(parents=True, exist_ok=True)
    (venv_root / "bin").mkdir(exist_ok=True)
    home = str(Path(base_python).parent)
    system = "true" if system_site_packages else "false"
    (venv_root / "pyvenv.cfg").write_text(
        f"home = {home}\ninclude-system-site-packages = {system}\nversion = {python}\n"
        f"executable = {base_python}\n"
    )
    for name, target in (
        ("python", base_python),
        ("python3", "python"),
        (f"python{python}", "python"),
    ):
        link = venv_root / "bin" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def install(
    *,
    wheels: Path,
    manifest: Path,
    lock: Path,
    venv: str,
    python: str,
    base_python: str,
    root: Path,
    system_site_packages: bool = False,
) -> int:
    """Install into ``root`` + ``venv`` (``root`` is ``/`` inside an image build)."""
    from installer import install as install_wheel  # noqa: PLC0415 - shipped beside this file
    from installer.destinations import SchemeDictionaryDestination  # noqa: PLC0415
    from installer.sources import WheelFile  # noqa: PLC0415

    files = check_wheelhouse(wheels, manifest, lock)
    venv_root = root / venv.lstrip("/")
    write_skeleton(venv_root, python, base_python, system_site_packages=system_site_packages)
    site = site_packages(venv_root, python)
    schemes = {
        "purelib": str(site),
        "platlib": str(site),
        "headers": str(venv_root / "include" / "site" / f"python{python}"),
        "scripts": str(venv_root / "bin"),
        "data": str(venv_root),
    }
    destination = SchemeDictionaryDestination(
        schemes,
        interpreter=f"{venv}/bin/python",
        script_kind="posix",
        bytecode_optimization_levels=(),
        # Two wheels may ship the same file (mlflow and mlflow-skinny both install
        # bin/mlflow); as with pip, the one installed last (file name order) wins.
        overwrite_existing=True,
    )
    for path in files:
        try:
            with WheelFile.open(path) as source:
                install_wheel(
                    source, destination, additional_metadata={"INSTALLER": INSTALLER_NAME}
                )
        except (ValueError, OSError, KeyError) as err:  # installer's checks of the wheel
            raise InstallError(f"{path.name} cannot be installed: {err}") from err
    return len(files)


def prune_tests(site: Path) -> tuple[int, int]:
    """Remove every ``tests`` directory inside a package under ``site``.

    Returns (directories removed, bytes freed). Symbolic links are neither followed nor
    removed as directories (a wheel can't ship one, but a tree could have one).
    """
    import shutil  # noqa: PLC0415

    removed = freed = 0
    for top in sorted(site.iterdir()):
        if not top.is_dir() or top.is_symlink():
            continue
        for where, dirs, _ in os.walk(top):
            for name in [d for d in dirs if d == "tests"]:
                path = Path(where) / name
                if path.is_symlink():
                    continue
                freed += sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())
                shutil.rmtree(path)
                dirs.remove(name)
                removed += 1
    return removed, freed


# Directories of tests, which a served model never imports.
SKIP_BYTECODE = r"/site-packages/(.+/)?(tests?|testing)/"


def compile_tree(paths: list[Path], *, strip: str | None = None, prepend: str | None = None) -> int:
    """Write unchecked-hash pycs for ``paths`` (directories or files) with this interpreter.

    ``strip``/``prepend`` rewrite the path recorded in the bytecode (and shown in
    tracebacks), when compiling a tree that is not yet at its final place.
    Returns how many files failed to compile (left without bytecode).
    """
    import compileall  # noqa: PLC0415
    import io  # noqa: PLC0415
    import py_compile  # noqa: PLC0415
    from contextlib import redirect_stdout  # noqa: PLC0415

    skip = re.compile(SKIP_BYTECODE)
    failed = 0
    mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    options = {
        "quiet": 1,
        "rx": skip,
        "stripdir": strip,
        "prependdir": prepend,
        "invalidation_mode": mode,
    }
    for path in sorted(paths):
        with redirect_stdout(io.StringIO()) as out:
            if path.is_dir():
                compileall.compile_dir(path, workers=1, **options)  # type: ignore[arg-type]
            elif path.suffix == ".py":
                compileall.compile_file(path, **options)  # type: ignore[arg-type]
        failed += out.getvalue().count("***")
    return failed


def compile_in_parallel(
    paths: list[Path],
    command: list[str],
    *,
    jobs: int,
    strip: str | None = None,
    prepend: str | None = None,
    where: Callable[[Path], str] = str,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``command --compile-only ...`` in ``jobs`` processes over groups of ``paths``.

    ``command`` runs this file with the image's interpreter (directly, or through the
    base's dynamic loader in its unpacked root file system); ``where`` maps a path to what
    that process sees. Each file is
    compiled the same whichever process does it, so the grouping doesn't show in the
    output.
    """
    import subprocess  # noqa: PLC0415

    # Belt and braces: marshal orders a frozenset by its elements' hashes.
    env = {**(os.environ if env is None else env), "PYTHONHASHSEED": "0"}
    groups: list[list[Path]] = [[] for _ in range(max(1, jobs))]
    loads = [0] * len(groups)
    for path, size in sorted(((p, _source_size(p)) for p in paths), key=lambda x: -x[1]):
        lightest = loads.index(min(loads))
        groups[lightest].append(path)
        loads[lightest] += size
    options = [*(["--strip", strip] if strip else []), *(["--prepend", prepend] if prepend else [])]
    running = []
    for group in groups:
        if group:
            argv = [*command, "--compile-only", *options, *map(where, group)]
            running.append((argv, subprocess.Popen(argv, env=env)))
    failed = [argv for argv, process in running if process.wait() != 0]
    if failed:
        raise InstallError(f"writing bytecode failed: {' '.join(failed[0][:6])} ...")


def _source_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.py") if p.is_file())


def site_packages(venv_root: Path, python: str) -> Path:
    return venv_root / "lib" / f"python{python}" / "site-packages"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-only"]:
        return _compile_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--venv", required=True, help="the venv's path in the image")
    parser.add_argument("--python", required=True, help="X.Y")
    parser.add_argument(
        "--base-python",
        default="auto",
        help="the venv's interpreter (auto: pythonX.Y on PATH, which also writes bytecode)",
    )
    parser.add_argument(
        "--system-site-packages",
        action="store_true",
        help="keep the interpreter's own site-packages visible (a conda environment's)",
    )
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument(
        "--compile", action="store_true", help="then write bytecode with this interpreter"
    )
    parser.add_argument(
        "--prune-tests", action="store_true", help="remove the packages' tests directories"
    )
    args = parser.parse_args(argv)
    base_python = args.base_python
    if base_python == "auto":
        import shutil  # noqa: PLC0415

        found = shutil.which(f"python{args.python}")
        if found is None:
            sys.stderr.write(f"wheelinstall: no python{args.python} on PATH\n")
            return 1
        base_python = found
    try:
        count = install(
            wheels=args.wheels,
            manifest=args.manifest,
            lock=args.lock,
            venv=args.venv,
            python=args.python,
            base_python=base_python,
            root=args.root,
            system_site_packages=args.system_site_packages,
        )
    except InstallError as err:
        sys.stderr.write(f"wheelinstall: {err}\n")
        return 1
    sys.stdout.write(f"wheelinstall: installed {count} wheels into {args.venv}\n")
    site = site_packages(args.root / args.venv.lstrip("/"), args.python)
    if args.prune_tests:
        removed, freed = prune_tests(site)
        sys.stdout.write(
            f"wheelinstall: removed {removed} tests directories ({freed / 2**20:.1f} MiB)\n"
        )
    if args.compile:
        try:
            compile_in_parallel(
                sorted(site.iterdir()),
                [sys.executable, str(Path(__file__).resolve())],
                jobs=len(os.sched_getaffinity(0)),
            )
        except InstallError as err:
            sys.stderr.write(f"wheelinstall: {err}\n")
            return 1
        sys.stdout.write("wheelinstall: bytecode written\n")
    return 0


def _compile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wheelinstall.py --compile-only")
    parser.add_argument("--strip", help="path prefix to remove from recorded file names")
    parser.add_argument("--prepend", help="path prefix to put in its place")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = compile_tree(args.paths, strip=args.strip, prepend=args.prepend)
    if failed:
        sys.stdout.write(f"wheelinstall: {failed} files don't compile (left without bytecode)\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
