"""The lock file: every distribution pinned with ``==`` and its sha256 hashes.

Format: a pip requirements file (``pip install --require-hashes -r`` reads it), with a
header that records what it was made for, and one ``# via`` comment per package saying
which input required it::

    # packager lock v1
    # target: python 3.11 (3.11.7) linux/amd64
    # resolver: uv 0.13.9
    # inputs: sha256:…
    --index-url https://pypi.org/simple
    acme-featurizer==0.1.0 \\
        --hash=sha256:…
        # via the model's requirements.txt

A model whose conda.yaml has conda packages adds a conda part after the pip part: a
conda-lock file in ``#| `` comment lines (``condalock.py`` says why inside, not beside).

Index URLs are kept without credentials. Local wheels (a model's ``wheels/``, a
``--wheel-dir``) are locked by name, version and hash; the wheelhouse finds them again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from packager.env.condalock import CondaLock, parse_block
from packager.env.target import Target
from packager.errors import LockError
from packager.redact import redact_uri

HEADER = "# packager lock v1"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s\\;]+)(\s*;\s*[^\\]+)?")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


@dataclass(frozen=True, kw_only=True)
class LockedPackage:
    name: str  # canonical
    version: str
    hashes: tuple[str, ...]  # "sha256:<hex>", sorted
    via: tuple[str, ...] = ()
    marker: str | None = None


@dataclass(frozen=True, kw_only=True)
class Lock:
    target: Target
    resolver: str
    inputs_digest: str
    index_url: str | None
    extra_index_urls: tuple[str, ...]
    packages: tuple[LockedPackage, ...]
    conda: CondaLock | None = None  # the conda packages, when the model has any

    def render(self) -> str:
        lines = [
            HEADER,
            (
                f"# target: python {self.target.python} ({self.target.python_full or '-'}) "
                f"{self.target.platform}"
            ),
            f"# resolver: {self.resolver}",
            f"# inputs: {self.inputs_digest}",
        ]
        if self.index_url:
            lines.append(f"--index-url {redact_uri(self.index_url)}")
        lines += [f"--extra-index-url {redact_uri(url)}" for url in self.extra_index_urls]
        for package in self.packages:
            pin = f"{package.name}=={package.version}"
            if package.marker:
                pin += f" ; {package.marker}"
            lines.append(pin + (" \\" if package.hashes else ""))
            for i, digest in enumerate(package.hashes):
                end = " \\" if i < len(package.hashes) - 1 else ""
                lines.append(f"    --hash={digest}{end}")
            lines += [f"    # via {via}" for via in package.via]
        if self.conda is not None:
            lines += self.conda.render_block()
        return "\n".join(lines) + "\n"

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.render().encode()).hexdigest()

    def get(self, name: str) -> LockedPackage | None:
        wanted = canonicalize_name(name)
        return next((p for p in self.packages if p.name == wanted), None)


def parse_lock(text: str, *, source: str = "lock") -> Lock:
    """Parse a lock written by :meth:`Lock.render` (or by hand in the same format)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise LockError(
            f"{source}: not a packager lock (the first line must be {HEADER!r})",
            hint="create one with `packager lock MODEL -o FILE`",
        )
    meta: dict[str, str] = {}
    index_url, extras = None, []
    for raw in lines[1:]:
        if raw.startswith("--index-url "):
            index_url = raw.split(None, 1)[1].strip()
        elif raw.startswith("--extra-index-url "):
            extras.append(raw.split(None, 1)[1].strip())
        elif raw.startswith("# ") and ":" in raw:
            key, _, value = raw[2:].partition(":")
            meta.setdefault(key.strip(), value.strip())
    match = re.match(r"python (\S+) \((\S+)\) (\S+)", meta.get("target", ""))
    if match is None:
        raise LockError(f"{source}: the '# target:' header line is missing or malformed")
    python, full, platform_name = match.groups()
    return Lock(
        target=Target.make(full if full != "-" else python, platform_name),
        resolver=meta.get("resolver", "unknown"),
        inputs_digest=meta.get("inputs", ""),
        index_url=index_url,
        extra_index_urls=tuple(extras),
        packages=packages_from(text, source=source),
        conda=parse_block(lines, source=source),
    )


def packages_from(
    text: str, *, source: str = "lock", describe: Callable[[str], str] = lambda via: via
) -> tuple[LockedPackage, ...]:
    """Packages from ``name==version \\ --hash=… # via …`` text (ours, uv's, pip-compile's).

    ``# via`` lines belong to a package when indented under it; ``describe`` rewrites them.
    """
    packages: list[LockedPackage] = []
    pin: re.Match[str] | None = None
    hashes: list[str] = []
    via: list[str] = []

    def flush() -> None:
        if pin is not None:
            packages.append(
                LockedPackage(
                    name=canonicalize_name(pin.group(1)),
                    version=pin.group(3),
                    marker=(pin.group(4) or "").strip(" ;\\") or None,
                    hashes=tuple(sorted(hashes)),
                    via=tuple(via),
                )
            )

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("--index-url", "--extra-index-url", "--find-links")):
            continue
        if line.startswith("--hash="):
            found = _HASH.search(line)
            if found is None:
                raise LockError(f"{source}:{number}: {line!r} is not a sha256 hash")
            hashes.append(found.group(1))
        elif line.startswith("#"):
            entry = line.removeprefix("# via").lstrip("#").strip()
            if entry and pin is not None and raw.startswith(" "):
                via.append(describe(entry))
        else:
            match = _PIN.match(line)
            if match is None:
                raise LockError(
                    f"{source}:{number}: {line!r} is not pinned with == "
                    "(every line of a lock must be)"
                )
            flush()
            pin, hashes, via = match, [], []
    flush()
    return tuple(sorted(packages, key=lambda p: p.name))


def read_lock(path: Path) -> Lock:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise LockError(f"cannot read the lock {path}: {err.strerror}") from err
    return parse_lock(text, source=str(path))


def unsatisfied(lock: Lock, requirements: list[tuple[str, str]]) -> list[str]:
    """Requirements (text, origin) the lock does not satisfy, described for the user."""
    problems = []
    env = {
        "python_version": lock.target.python,
        "python_full_version": lock.target.python_full or f"{lock.target.python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": lock.target.arch,
        "implementation_name": "cpython",
    }
    for text, origin in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        locked = lock.get(req.name)
        if locked is None:
            problems.append(f"{req.name} ({origin}: {text}) is not in the lock")
            continue
        if not locked.hashes:
            problems.append(f"{req.name}=={locked.version} has no --hash in the lock")
        try:
            version = Version(locked.version)
        except InvalidVersion:
            problems.append(f"{req.name}=={locked.version}: not a valid version")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={locked.version} does not satisfy {text} ({origin})")
    return problems
