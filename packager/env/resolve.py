"""Resolve lock inputs into a :class:`Lock`, with uv or pip-tools, cached by input digest.

* **uv** (default): ``uv pip compile`` resolves for the image's Python and platform
  (``--python-version``, ``--python-platform``) from any host, so a lock made on this
  machine for a 3.12 model or for arm64 is right for that image. uv is the reason locking
  can target another platform at all; it is also the faster resolver.
* **pip-tools**: ``pip-compile`` resolves for the interpreter it runs in, so it is used
  only when this interpreter matches the target (same Python minor, Linux, same CPU);
  otherwise packager refuses and names uv.

Both read the model's requirements and the server's from separate files, so each lock
line's ``# via`` says which input required it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol
from urllib.parse import urlsplit

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from packager.env.inputs import HOW_TO_AUTHENTICATE, LockInputs, index_key
from packager.env.lock import (
    Lock,
    packages_from,
    parse_lock,
    read_lock,
    unsatisfied,
)
from packager.errors import (
    CommandFailedError,
    IndexAuthError,
    LockError,
    PackagerError,
    ResolutionError,
    UsageError,
)
from packager.redact import redact_uri
from packager.runner import find_tool, run

log = logging.getLogger(__name__)

ResolverName = Literal["uv", "pip-tools"]
_VIA = {
    "model.in": "the model's requirements",
    "server.in": "packager_server (the image's scoring server)",
    "constraints.in": "the model's constraints",
}


class Resolver(Protocol):
    name: ResolverName

    def identity(self) -> str: ...

    def compile(self, inputs: LockInputs, work: Path) -> str: ...


@dataclass(frozen=True)
class LockResult:
    lock: Lock
    cached: bool
    seconds: float
    from_file: bool = False


def make_resolver(name: str) -> Resolver:
    if name == "uv":
        return UvResolver()
    if name == "pip-tools":
        return PipToolsResolver()
    raise UsageError(f"unknown resolver {name!r}", hint="use --resolver uv or pip-tools")


class _ToolResolver:
    """A resolver run as an external tool, identified by its version."""

    tool: ClassVar[str]
    install_hint: ClassVar[str]

    def __init__(self) -> None:
        self.exe = find_tool(self.tool, install_hint=self.install_hint)
        self._identity: str | None = None

    def identity(self) -> str:
        if self._identity is None:
            out = run([self.exe, "--version"], what=f"{self.tool} --version").stdout
            self._identity = self._describe_version(out.strip())
        return self._identity

    def _describe_version(self, output: str) -> str:
        return output


class UvResolver(_ToolResolver):
    name: ResolverName = "uv"
    tool = "uv"
    install_hint = "pip install uv"

    def compile(self, inputs: LockInputs, work: Path) -> str:
        target = inputs.target
        argv = [
            self.exe,
            "pip",
            "compile",
            "model.in",
            "server.in",
            "--python-version",
            target.python_full or target.python,
            "--python-platform",
            target.uv_platform,
            "--generate-hashes",
            "--no-header",
            "--annotation-style",
            "split",
            "--quiet",
            "--output-file",
            "lock.txt",
        ]
        argv += _common_args(inputs)
        run(argv, what="locking with uv", cwd=work, secret_env=inputs.secret_env)
        return (work / "lock.txt").read_text()


class PipToolsResolver(_ToolResolver):
    name: ResolverName = "pip-tools"
    tool = "pip-compile"
    install_hint = "pip install pip-tools"

    def _describe_version(self, output: str) -> str:
        return "pip-tools " + output.rsplit(maxsplit=1)[-1]

    def compile(self, inputs: LockInputs, work: Path) -> str:
        if not inputs.target.matches_host():
            raise UsageError(
                f"pip-tools resolves for the interpreter it runs in, not for "
                f"{inputs.target.describe()}",
                hint="use --resolver uv, which locks for any target, or run packager with "
                f"a Python {inputs.target.python} interpreter on {inputs.target.platform}",
            )
        # Not --quiet: it also hides pip's "401 Error, Credentials not correct for URL",
        # and then an index's refusal reads as "no matching distribution".
        argv = [
            self.exe,
            "--generate-hashes",
            "--no-header",
            "--annotation-style",
            "split",
            "--strip-extras",
            "--no-emit-index-url",
            "--no-emit-find-links",
            "--output-file",
            "lock.txt",
            "model.in",
            "server.in",
        ]
        argv += _common_args(inputs)
        run(argv, what="locking with pip-tools", cwd=work, secret_env=inputs.secret_env)
        return (work / "lock.txt").read_text()


def _common_args(inputs: LockInputs) -> list[str]:
    args: list[str] = []
    if inputs.constraints:
        args += ["--constraint", "constraints.in"]
    for directory in inputs.find_links:
        args += ["--find-links", str(directory)]
    if inputs.no_index:
        args.append("--no-index")
    return args


def lock(
    inputs: LockInputs, resolver: Resolver, *, cache_root: Path, lock_file: Path | None = None
) -> LockResult:
    """A lock for ``inputs``: the user's ``lock_file`` (verified), the cache, or a new one."""
    started = time.monotonic()
    if lock_file is not None:
        locked = read_lock(lock_file)
        _verify(locked, inputs, str(lock_file))
        return LockResult(
            lock=locked, cached=False, seconds=time.monotonic() - started, from_file=True
        )
    key = inputs.digest(resolver.identity())
    store = LockStore(cache_root)
    cached = store.get(key)
    if cached is not None:
        return LockResult(lock=cached, cached=True, seconds=time.monotonic() - started)
    with tempfile.TemporaryDirectory(prefix="packager-lock-") as tmp:
        work = Path(tmp)
        (work / "model.in").write_text("".join(f"{r}\n" for r, _ in inputs.model_requirements))
        (work / "server.in").write_text("".join(f"{r}\n" for r in inputs.server_requirements))
        (work / "constraints.in").write_text("".join(f"{c}\n" for c in inputs.constraints))
        try:
            raw = resolver.compile(inputs, work)
        except CommandFailedError as err:
            raise _resolution_error(err, inputs, resolver.name) from err
    result = Lock(
        target=inputs.target,
        resolver=resolver.identity(),
        inputs_digest=key,
        index_url=redact_uri(inputs.index_url) if inputs.index_url else None,
        extra_index_urls=tuple(redact_uri(u) for u in inputs.extra_index_urls),
        packages=packages_from(raw, source=f"{resolver.name}'s output", describe=_describe_via),
    )
    _verify(result, inputs, f"the {resolver.name} lock")
    store.put(key, result)
    return LockResult(lock=result, cached=False, seconds=time.monotonic() - started)


def _describe_via(text: str) -> str:
    for file_name, label in _VIA.items():
        text = re.sub(rf"-[rc] {re.escape(file_name)}", label, text)
    return text


def _verify(locked: Lock, inputs: LockInputs, source: str) -> None:
    if (
        locked.target.python != inputs.target.python
        or locked.target.platform != inputs.target.platform
    ):
        raise LockError(
            f"{source} was made for {locked.target.describe()}, the image needs "
            f"{inputs.target.describe()}",
            hint="make a new one with `packager lock MODEL -o FILE`",
        )
    wanted = [
        *inputs.model_requirements,
        *((r, "packager_server") for r in inputs.server_requirements),
    ]
    problems = unsatisfied(locked, wanted)
    if problems:
        raise LockError(
            f"{source} does not satisfy the model:\n  " + "\n  ".join(problems),
            hint="update the lock with `packager lock MODEL -o FILE`",
        )


def _resolution_error(
    err: CommandFailedError, inputs: LockInputs, resolver: str
) -> ResolutionError | IndexAuthError:
    """Say what went wrong: an index's refusal first, since resolvers report a package on
    an index that answered 401 as missing (and so as a conflict of whatever pins it)."""
    output = err.output
    refused = _auth_failure(output, inputs, resolver)
    if refused is not None:
        return refused
    model = {
        canonicalize_name(Requirement(r).name): (r, where) for r, where in inputs.model_requirements
    }
    clashes = []
    for requirement in inputs.server_requirements:
        name = canonicalize_name(Requirement(requirement).name)
        if (
            name in model
            and _may_clash(model[name][0], requirement)
            and re.search(rf"\b{re.escape(name)}\b", output, re.IGNORECASE)
        ):
            text, where = model[name]
            clashes.append(
                f"the model requires {text} ({where}); packager_server requires {requirement}"
            )
    if clashes:
        return ResolutionError(
            "the model's requirements conflict with the scoring server's:\n  "
            + "\n  ".join(clashes),
            hint="relax the model's pin (log the model again with a compatible version)",
        )
    if "Failed to fetch" in output or "Could not fetch" in output or "connect" in output.lower():
        return ResolutionError(
            f"a package index could not be reached while locking with "
            f"{resolver}:\n{output[-3000:]}",
            hint="check the index URL and its credentials (netrc or --index-url)",
        )
    return ResolutionError(
        f"the requirements cannot be resolved with {resolver}:\n{output[-3000:]}",
        hint="the lines above name the conflicting pins",
    )


# What uv (0.13) and pip say when an index answers 401 or 403, with the URL they asked.
_REFUSALS = (
    re.compile(r"index URL \((?P<url>\S+)\) could not be queried .*\((?P<status>401 \w+)\)"),
    re.compile(r"index \((?P<url>\S+)\) returned a (?P<status>403 \w+) error"),
    re.compile(r"(?P<status>40[13]) Error, Credentials not correct for (?P<url>\S+)"),
    re.compile(r"\((?P<status>40[13] \w+)\) for url \((?P<url>[^)\s]+)\)"),
)
# Other wordings (another version of either tool): a refusal, without a URL we can parse.
_ANY_REFUSAL = re.compile(
    r"\b(401 Unauthori[sz]ed|403 Forbidden|40[13] Client Error)|authentication credentials",
    re.IGNORECASE,
)


def _auth_failure(output: str, inputs: LockInputs, resolver: str) -> IndexAuthError | None:
    """An :class:`IndexAuthError` naming each index that answered 401/403, if one did."""
    ours = [u for u in (inputs.index_url, *inputs.extra_index_urls) if u]
    hint = (
        f"pass the index with its credentials: {HOW_TO_AUTHENTICATE}; packager never uses "
        "credentials written in the model's requirements"
    )
    refusals: dict[str, str] = {}
    for pattern in _REFUSALS:
        for found in pattern.finditer(output):
            index = _index_for(found["url"], ours)
            status = {"401": "401 Unauthorized", "403": "403 Forbidden"}.get(
                found["status"], found["status"]
            )
            if "@" in urlsplit(index).netloc:
                why = "it refused the credentials given with its URL"
            else:
                why = "no credentials were given with its URL, and netrc has none it accepts"
            refusals.setdefault(redact_uri(index), f"{status}: {why}")
    if refusals:
        return IndexAuthError(
            "\n".join(
                f"the package index {url} answered {why} (while locking with {resolver})"
                for url, why in refusals.items()
            ),
            hint=hint,
        )
    if _ANY_REFUSAL.search(output):
        named = ", ".join(redact_uri(u) for u in ours) or "the default index"
        return IndexAuthError(
            f"a package index ({named}) refused packager (401/403) while locking with "
            f"{resolver}:\n{output[-3000:]}",
            hint=hint,
        )
    return None


def _index_for(url: str, indexes: list[str]) -> str:
    """The index ``url`` belongs to: pip names a project page (``/simple/six/``), uv may name
    a file (``/files/six.whl``) on the index's host."""
    host, path = index_key(url)
    for index in indexes:
        index_host, index_path = index_key(index)
        if host == index_host and (path == index_path or path.startswith(index_path + "/")):
            return index
    return next((i for i in indexes if index_key(i)[0] == host), url)


def _may_clash(model_requirement: str, server_requirement: str) -> bool:
    """False when the model's exact pin is inside the server's range: these two agree, and
    the failure lies elsewhere (an index's refusal, a missing version, another package)."""
    pins = [
        s.version
        for s in Requirement(model_requirement).specifier
        if s.operator in ("==", "===") and "*" not in s.version
    ]
    server = Requirement(server_requirement).specifier
    try:
        return not pins or not all(server.contains(Version(v), prereleases=True) for v in pins)
    except InvalidVersion:
        return True


class LockStore:
    """Locks by input digest under ``<cache>/locks/v1``; written atomically."""

    def __init__(self, cache_root: Path) -> None:
        self.root = cache_root / "locks" / "v1"

    def _path(self, key: str) -> Path:
        return self.root / (key.removeprefix("sha256:") + ".txt")

    def get(self, key: str) -> Lock | None:
        path = self._path(key)
        try:
            return parse_lock(path.read_text(), source=str(path))
        except FileNotFoundError:
            return None
        except (OSError, PackagerError) as err:
            log.warning("ignoring a damaged cached lock %s: %s", path, err)
            return None

    def put(self, key: str, value: Lock) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(value.render())
            Path(tmp).replace(self._path(key))
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
