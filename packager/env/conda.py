"""Solve a model's conda packages with py-rattler, for the image's platform, from any host.

No conda, mamba or micromamba: rattler (the library behind pixi) fetches the channels'
repodata and solves with resolvo in-process, for ``linux-64`` or ``linux-aarch64`` with
the image's virtual packages (Linux, glibc 2.36 of the Debian bookworm bases), whatever
machine packager runs on.

Channels: ``--conda-channel URL`` (repeatable) replaces the ones ``conda.yaml`` names, so
a user can point a model logged against ``conda-forge`` at a mirror or a private channel.
Credentials go in the URL (``https://USER:TOKEN@host/channel``) and stay there: every URL
in a lock, a log line or an error is redacted first (``redact_uri``/``scrub``), and a
token the model's own conda.yaml carried was already dropped by the spec reader.

``python``: when ``conda.yaml`` names it (MLflow always does), it is part of the solve,
and the solved version is the Python the pip part is locked for (the image's interpreter
will come from the conda prefix, as with MLflow's conda env manager). ``--python X.Y``
replaces conda.yaml's pin.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import rattler
from rattler.exceptions import GatewayError, InvalidMatchSpecError, SolverError

from packager.env.condalock import CondaLock, CondaPackage, normalize_depends
from packager.env.target import GLIBC, Platform
from packager.errors import IndexAuthError, LockError, ResolutionError, UsageError
from packager.redact import redact_uri, redact_uris_in, scrub, secret_parts
from packager.spec.environment import CondaEnv

log = logging.getLogger(__name__)

SUBDIRS: dict[str, str] = {"linux/amd64": "linux-64", "linux/arm64": "linux-aarch64"}
# Where else to look when a package has no build for the target, to name where it has one.
_OTHER_SUBDIRS = ("linux-64", "linux-aarch64", "linux-ppc64le", "osx-64", "osx-arm64", "win-64")
# The image's virtual packages: a Linux kernel new enough for any build, the bases' glibc.
_VIRTUAL = (("__unix", "0"), ("__linux", "6.1"), ("__glibc", f"{GLIBC[0]}.{GLIBC[1]}"))
CHANNEL_HINT = (
    "pass the channels to solve against with --conda-channel URL (repeatable; it replaces "
    "the channels conda.yaml names), with USER:TOKEN@ before the host for one that needs "
    "credentials"
)


def conda_specs(env: CondaEnv, python: str | None = None) -> tuple[str, ...]:
    """What to solve: conda.yaml's packages, and its python (or ``--python``'s)."""
    specs = list(env.conda_packages)
    if python is not None:
        specs.append(f"python {python}.*" if python.count(".") < 2 else f"python =={python}")
    elif env.python:
        specs.append(f"python {env.python}" if env.python[0] in "<>=!" else f"python ={env.python}")
    return tuple(specs)


def solve_conda(
    env: CondaEnv,
    platform: Platform,
    *,
    channels: Sequence[str] = (),
    python: str | None = None,
    cache_root: Path,
) -> CondaLock:
    """Solve ``env``'s conda packages for ``platform`` against ``channels`` (default: the
    file's). Channel URLs may carry credentials; the result carries none."""
    subdir = SUBDIRS[platform]
    sources = tuple(channels) or env.channels
    if not sources:
        raise UsageError(
            "the model's conda.yaml names conda packages but no channel to find them in",
            hint=CHANNEL_HINT,
        )
    specs = conda_specs(env, python)
    try:
        parsed = [rattler.MatchSpec(s) for s in specs]
    except InvalidMatchSpecError as err:
        raise UsageError(
            f"conda.yaml: {scrub(str(err))}", hint="fix the spec in conda.yaml"
        ) from err
    secrets = channel_secrets(sources)
    with _repodata_cache(cache_root, secrets) as cache_dir:
        gateway = rattler.Gateway(cache_dir=cache_dir)
        _check_platforms(gateway, sources, subdir, parsed, secrets)
        try:
            records = asyncio.run(
                rattler.solve(
                    sources=list(sources),
                    specs=parsed,
                    gateway=gateway,
                    platforms=[rattler.Subdir(subdir), rattler.Subdir("noarch")],
                    virtual_packages=_virtual_packages(),
                    channel_relations="disabled",
                )
            )
        except GatewayError as err:
            raise _channel_error(err, sources, secrets) from err
        except SolverError as err:
            raise _conflict(err, specs, parsed, subdir, secrets) from err
    packages = tuple(sorted((_package(r) for r in records), key=lambda p: p.name))
    log.info("solved %d conda packages for %s", len(packages), subdir)
    return CondaLock(
        platform=subdir,
        channels=tuple(redact_uri(s) for s in sources),
        specs=specs,
        packages=packages,
    )


@contextmanager
def _repodata_cache(cache_root: Path, secrets: Sequence[str]) -> Iterator[Path]:
    """Where rattler caches repodata: packager's cache, except for a channel given with
    credentials, whose URL (user info and all) rattler writes into its cache entries and
    their names: that repodata is cached for this solve only, in a private temporary
    directory, so no password lands in a cache that may be shared or uploaded."""
    if not secrets:
        yield cache_root / "conda" / "repodata"
        return
    with tempfile.TemporaryDirectory(prefix="packager-repodata-") as tmp:
        yield Path(tmp)


def channel_secrets(sources: Sequence[str]) -> list[str]:
    """What to scrub from the solver's messages: the user info of channel URLs only (a
    channel name such as ``conda-forge`` is no secret, and scrubbing it hides the channel)."""
    return [part for source in sources if "://" in source for part in secret_parts(source)]


def _subdirs(*names: str) -> list[rattler.Subdir]:
    return [rattler.Subdir(name) for name in names]


def _conflict(
    err: SolverError,
    specs: tuple[str, ...],
    parsed: list[rattler.MatchSpec],
    subdir: str,
    secrets: list[str],
) -> ResolutionError:
    """The solver's explanation, led by the requests it involves: resolvo names the
    dependency that cannot be met (``libacme >=1``), not always the pin that excluded it
    (conda.yaml's ``libacme <1``)."""
    text = scrub(str(err), secrets)
    involved = [
        spec
        for spec, match in zip(specs, parsed, strict=True)
        if re.search(rf"(?<![\w.-]){re.escape(match.name.normalized)}(?![\w.-])", text)
    ]
    return ResolutionError(
        f"the conda packages cannot be solved together for {subdir}; conda.yaml asks for "
        f"{', '.join(involved or specs)}:\n" + _indent(text),
        hint="the lines above name the conflicting packages; relax a pin in conda.yaml",
    )


def _virtual_packages() -> list[rattler.GenericVirtualPackage]:
    return [
        rattler.GenericVirtualPackage(
            rattler.PackageName(name), rattler.Version(version), rattler.BuildString("0")
        )
        for name, version in _VIRTUAL
    ]


def _check_platforms(
    gateway: rattler.Gateway,
    sources: Sequence[str],
    subdir: str,
    specs: list[rattler.MatchSpec],
    secrets: list[str],
) -> None:
    """A requested package with no build for the target (nor noarch) is named with the
    platforms it does have, rather than as the solver's bare "no candidates"."""
    names = [s.name.normalized for s in specs]
    try:
        here = asyncio.run(
            gateway.query(sources, _subdirs(subdir, "noarch"), names, recursive=False)
        )
        found = {r.name.normalized for records in here for r in records}
        missing = [n for n in names if n not in found]
        if not missing:
            return
        elsewhere = asyncio.run(
            gateway.query(
                sources,
                _subdirs(*(s for s in _OTHER_SUBDIRS if s != subdir)),
                missing,
                recursive=False,
            )
        )
    except GatewayError as err:
        raise _channel_error(err, sources, secrets) from err
    where: dict[str, set[str]] = {}
    for records in elsewhere:
        for record in records:
            where.setdefault(record.name.normalized, set()).add(record.subdir)
    shown = ", ".join(redact_uri(s) for s in sources)
    problems = [
        f"{name} has no build for {subdir} (nor noarch) in {shown}; it has builds for "
        f"{', '.join(sorted(where[name]))}"
        if name in where
        else f"{name} is not in {shown} (for any platform)"
        for name in missing
    ]
    raise ResolutionError(
        "\n".join(problems),
        hint="pick a channel that builds it for the image's platform (--conda-channel URL), "
        "or build the image for a platform it has (--platform)",
    )


_STATUS = re.compile(r"\b(401|403)\b")


def _channel_error(
    err: Exception, sources: Sequence[str], secrets: list[str]
) -> ResolutionError | IndexAuthError:
    """Name the channel that failed (without credentials) and what to pass instead."""
    text = scrub(redact_uris_in(str(err)), secrets)
    failed = next(
        (redact_uri(s) for s in sources if redact_uri(s).rstrip("/") in text),
        ", ".join(redact_uri(s) for s in sources),
    )
    status = _STATUS.search(text)
    if status is not None:
        return IndexAuthError(
            f"the conda channel {failed} refused packager ({status.group(1)}):\n" + _indent(text),
            hint=CHANNEL_HINT,
        )
    return ResolutionError(
        f"the conda channel {failed} could not be reached:\n" + _indent(text),
        hint=CHANNEL_HINT,
    )


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines())


def _hex(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.hex() if isinstance(value, bytes) else str(value)


def _package(record: rattler.RepoDataRecord) -> CondaPackage:
    sha256 = _hex(record.sha256)
    if not sha256:
        raise LockError(
            f"the channel gives no sha256 for {record.file_name}; packager locks conda "
            "packages by sha256",
            hint="re-index the channel with a current indexer (rattler-index, conda-index)",
        )
    return CondaPackage(
        name=record.name.normalized,
        version=str(record.version),
        build=str(record.build),
        subdir=record.subdir,
        url=redact_uri(record.url),
        sha256=sha256,
        md5=_hex(record.md5),
        depends=normalize_depends(record.depends),
    )


def check_conda_lock(
    locked: CondaLock, env: CondaEnv, platform: Platform, *, source: str, python: str | None = None
) -> None:
    """A user's lock (``--lock FILE``) must be for this platform and satisfy every spec."""
    subdir = SUBDIRS[platform]
    if locked.platform != subdir:
        raise LockError(
            f"{source}: its conda packages are for {locked.platform}, the image needs {subdir}",
            hint="make a new one with `packager lock MODEL -o FILE`",
        )
    problems = []
    for text in conda_specs(env, python):
        spec = rattler.MatchSpec(text)
        name = spec.name.normalized
        package = locked.get(name)
        if package is None:
            problems.append(f"{name} ({text}) is not in the lock's conda part")
        elif spec.version is not None and not rattler.VersionSpec(str(spec.version)).matches(
            rattler.Version(package.version)
        ):
            problems.append(f"{name}={package.version} does not satisfy {text}")
    if problems:
        raise LockError(
            f"{source} does not satisfy the model's conda.yaml:\n  " + "\n  ".join(problems),
            hint="update the lock with `packager lock MODEL -o FILE`",
        )


def conda_part(
    env: CondaEnv,
    platform: str,
    *,
    channels: Sequence[str] = (),
    python: str | None = None,
    lock_file: Path | None = None,
    cache_root: Path,
) -> CondaLock:
    """The conda part of a model's lock: from the user's lock file (checked), else solved."""
    if platform not in SUBDIRS:
        raise UsageError(
            f"unsupported platform {platform!r}", hint=f"use one of: {', '.join(SUBDIRS)}"
        )
    chosen: Platform = "linux/amd64" if platform == "linux/amd64" else "linux/arm64"
    if lock_file is not None:
        from packager.env.lock import read_lock  # noqa: PLC0415 - lock imports this module's kin

        locked = read_lock(lock_file).conda
        if locked is None:
            raise LockError(
                f"{lock_file} has no conda part, and the model's conda.yaml needs conda packages",
                hint="make a new one with `packager lock MODEL -o FILE`, or pass "
                "--ignore-conda to lock only the pip requirements",
            )
        check_conda_lock(locked, env, chosen, source=str(lock_file), python=python)
        return locked
    return solve_conda(env, chosen, channels=channels, python=python, cache_root=cache_root)
