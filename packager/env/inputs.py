"""What to resolve: the model's requirements, its wheels and indexes, and the server's needs.

Requirement lines that name wheel files become ``name==version`` pins plus a find-links
directory, so resolvers treat them as packages (with hashes) instead of paths:

* ``wheels/x.whl`` (``add_libraries_to_model``): the model's own ``wheels/`` directory;
* an absolute path (``/dbfs/…/x.whl``, written by MLflow on Databricks): the file if it
  exists here, else a wheel of that name in a ``--wheel-dir``, else an error that says how
  to provide it;
* a direct URL to a wheel (``pkg @ https://host/pkg-1.0-py3-none-any.whl``): the same
  wheel from a ``--wheel-dir`` (or the file itself for a ``file:`` URL that exists here).
  packager never fetches a URL a model names, and any other direct URL (``git+``, an
  sdist) is refused with the line and what to do instead.

Credentials: requirement files carry index URLs without credentials (the spec strips
them). Credentials come from the options (``--index-url https://user:token@…``, or
``PIP_INDEX_URL``/``PIP_EXTRA_INDEX_URL``), matched to the requirement file's indexes by
host and path, or from ``~/.netrc`` (``NETRC``), which uv and pip read themselves. They are
passed to the tools through the environment, never on a command line. An index line that
carried credentials in the model is refused unless the options or netrc provide that index
(see ``_Collector._index`` for why they are not used).
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from packager.digest import hash_file
from packager.env.target import Target
from packager.errors import IndexAuthError, MissingWheelError, UnsupportedRequirementError
from packager.redact import redact_uri
from packager.spec import LineKind, ModelSpec, RequirementLine
from packager.spec.model import PYFUNC


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    """User-supplied package sources (URLs may carry credentials)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    wheel_dirs: tuple[Path, ...] = ()

    @classmethod
    def from_environment(
        cls,
        *,
        index_url: str | None = None,
        extra_index_urls: tuple[str, ...] = (),
        wheel_dirs: tuple[Path, ...] = (),
    ) -> IndexOptions:
        """Flags first, then pip's usual variables (common in CI)."""
        env_extra = tuple(os.environ.get("PIP_EXTRA_INDEX_URL", "").split())
        return cls(
            index_url=index_url or os.environ.get("PIP_INDEX_URL") or None,
            extra_index_urls=extra_index_urls or env_extra,
            wheel_dirs=wheel_dirs,
        )


@dataclass(frozen=True, kw_only=True)
class LockInputs:
    target: Target
    model_requirements: tuple[tuple[str, str], ...]  # (requirement, where it came from)
    server_requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    index_url: str | None  # may carry credentials: never log or write it
    extra_index_urls: tuple[str, ...]  # likewise
    find_links: tuple[Path, ...]
    local_wheels: tuple[tuple[str, str], ...]  # (file name, sha256) of every local wheel
    no_index: bool = False

    def digest(self, resolver: str) -> str:
        """Everything that can change the lock, without secrets."""
        data = {
            "resolver": resolver,
            "target": [self.target.python, self.target.python_full, self.target.platform],
            "model": list(self.model_requirements),
            "server": list(self.server_requirements),
            "constraints": list(self.constraints),
            "index": redact_uri(self.index_url) if self.index_url else None,
            "extra": [redact_uri(u) for u in self.extra_index_urls],
            "wheels": sorted(self.local_wheels),
            "no_index": self.no_index,
        }
        blob = json.dumps(data, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    @property
    def secret_env(self) -> dict[str, str]:
        """Index URLs for uv and pip, through the environment."""
        env = {}
        if self.index_url:
            env["UV_INDEX_URL"] = env["PIP_INDEX_URL"] = self.index_url
        if self.extra_index_urls:
            env["UV_EXTRA_INDEX_URL"] = env["PIP_EXTRA_INDEX_URL"] = " ".join(self.extra_index_urls)
        return env


# Loaders verified to load with mlflow-skinny plus SKINNY_EXTRAS (tests/integration/
# test_lock.py loads a model in a fresh environment). Other flavors keep full mlflow.
SKINNY_LOADERS = frozenset({"mlflow.pyfunc.model", "mlflow.sklearn"})
# mlflow.pyfunc imports numpy and pandas; the server reads parquet bodies with pyarrow.
SKINNY_EXTRAS = ("numpy", "pandas", "pyarrow")


def build_inputs(
    spec: ModelSpec,
    target: Target,
    options: IndexOptions,
    server_requirements: tuple[str, ...],
    *,
    mlflow_skinny: bool = False,
) -> LockInputs:
    found = _Collector(spec, options)
    for line in spec.requirements:
        found.add(line)
    for directory in options.wheel_dirs:
        if directory not in found.find_links:
            found.find_links.append(directory)
        found.local_wheels += [(w.name, hash_file(w)) for w in sorted(directory.glob("*.whl"))]
    model_reqs = _swap_for_skinny(spec, found.requirements) if mlflow_skinny else found.requirements
    model_reqs += _cloudpickle_pin(spec, model_reqs)
    chosen_index = options.index_url or _with_credentials(found.index_url, options)
    chosen_extras = [_with_credentials(u, options) or u for u in found.extra_index_urls]
    chosen_extras += [u for u in options.extra_index_urls if u not in chosen_extras]
    return LockInputs(
        target=target,
        model_requirements=tuple(model_reqs),
        server_requirements=server_requirements,
        constraints=tuple(found.constraints),
        index_url=chosen_index,
        extra_index_urls=tuple(dict.fromkeys(chosen_extras)),
        find_links=tuple(found.find_links),
        local_wheels=tuple(found.local_wheels),
        no_index=found.no_index,
    )


class _Collector:
    """Sorts a model's requirement lines into what the resolvers need."""

    def __init__(self, spec: ModelSpec, options: IndexOptions) -> None:
        self.spec, self.options = spec, options
        self.requirements: list[tuple[str, str]] = []
        self.constraints: list[str] = []
        self.find_links: list[Path] = []
        self.local_wheels: list[tuple[str, str]] = []
        self.index_url: str | None = None
        self.extra_index_urls: list[str] = []
        self.no_index = False
        self._hashes = {w.path: w.sha256 for w in (spec.wheels.wheels if spec.wheels else ())}

    def add(self, line: RequirementLine) -> None:
        where = f"{line.file}:{line.line_no}"
        handler = {
            LineKind.REQUIREMENT: self._requirement,
            LineKind.LOCAL_WHEEL: self._wheel,
            LineKind.INDEX_URL: self._index,
            LineKind.EXTRA_INDEX_URL: self._index,
            LineKind.FIND_LINKS: self._find_links,
            LineKind.NO_INDEX: self._find_links,
        }.get(line.kind)
        if line.kind in (LineKind.EDITABLE, LineKind.LOCAL_PATH):
            raise UnsupportedRequirementError(
                f"{where}: {line.text!r} installs from a source tree, which cannot be locked "
                "by hash",
                hint="build it into a wheel, pass its directory with --wheel-dir, and require "
                "it by name",
            )
        if handler is not None:  # trusted hosts and other pip options need no action
            handler(line, where)

    def _requirement(self, line: RequirementLine, where: str) -> None:
        if line.url is not None:
            self._direct_url(line, where)
        elif line.constraint:
            self.constraints.append(line.text)
        else:
            self.requirements.append((line.text, where))

    def _wheel(self, line: RequirementLine, where: str) -> None:
        path = _locate_wheel(self.spec, line, self.options)
        self._add_wheel(path, _wheel_pin(path, where), where)

    def _add_wheel(self, path: Path, pin: str, where: str, *, constraint: bool = False) -> None:
        if constraint:
            self.constraints.append(pin)
        else:
            self.requirements.append((pin, where))
        if path.parent not in self.find_links:
            self.find_links.append(path.parent)
        relative = _relative_to(path, self.spec.path) or ""
        self.local_wheels.append((path.name, self._hashes.get(relative) or hash_file(path)))

    def _direct_url(self, line: RequirementLine, where: str) -> None:
        """``name @ URL``: a copy of the URL's wheel the user provides (in a ``--wheel-dir``,
        or the file of a ``file:`` URL, as for absolute wheel paths), else refused.

        Handing the URL to the resolver would lock nothing usable: uv writes
        ``name @ URL`` into its output, which is not a ``name==version`` pin the lock format,
        the wheelhouse and the image's offline install can use. And the URL is the model's,
        not the user's: packager would fetch whatever host a model names, whose bytes may
        change under the same URL. A wheel file the user provides is locked by its hash,
        like the model's own ``wheels/``.
        """
        url = urlsplit(line.url or "")
        file_name = PurePosixPath(unquote(url.path)).name
        path = None
        if file_name.endswith(".whl"):
            local = Path(unquote(url.path))
            if url.scheme == "file" and not url.netloc and local.is_file():
                path = local
            else:
                path = next(
                    (d / file_name for d in self.options.wheel_dirs if (d / file_name).is_file()),
                    None,
                )
        if path is None:
            raise UnsupportedRequirementError(
                f"{where}: {line.text!r} installs {line.name} from a URL; packager locks "
                "packages from indexes and wheel files by hash, and does not fetch URLs a "
                "model names",
                hint=_direct_url_hint(line, file_name),
            )
        name, _, version = _wheel_pin(path, where).partition("==")
        if name != line.name:
            raise UnsupportedRequirementError(
                f"{where}: {path} is not a wheel of {line.name}, which {line.text!r} requires"
            )
        extras = f"[{','.join(line.extras)}]" if line.extras else ""
        marker = f" ; {line.marker}" if line.marker else ""
        pin = f"{name}{extras}=={version}{marker}"
        self._add_wheel(path, pin, where, constraint=line.constraint)

    def _index(self, line: RequirementLine, where: str) -> None:
        # A password in the model's own index line is not used, on purpose. The spec drops
        # it when parsing (secrets never enter specs, which `inspect` prints and every stage
        # reads), and it belongs to whoever logged the model: anyone who can read the model
        # can read it, it cannot be rotated without logging the model again, and packager
        # cannot tell whether it is still meant to be used. Locking without it would end in
        # the index's 401 after a resolver run, so refuse now, naming the line and the
        # doors that keep credentials out of argv, logs and locks (options, PIP_* variables
        # and netrc). Giving the index through one of them is the user's answer, with or
        # without credentials (an index that needs none).
        if line.had_credentials and not _index_given(line.url or "", self.options):
            raise IndexAuthError(
                f"{where}: the model's requirements give credentials for the package index "
                f"{line.url}; packager does not use credentials stored in a model",
                hint=f"pass the index with its credentials when locking: {HOW_TO_AUTHENTICATE}"
                "; a token stored in a model is readable by everyone who can read the model: "
                "consider rotating it",
            )
        if line.kind is LineKind.INDEX_URL:
            self.index_url = line.url
        else:
            self.extra_index_urls.append(line.url or "")

    def _find_links(self, line: RequirementLine, where: str) -> None:  # noqa: ARG002
        if line.kind is LineKind.NO_INDEX:
            self.no_index = True
        else:
            self.find_links.append(_find_links_dir(self.spec, line))


def _cloudpickle_pin(spec: ModelSpec, requirements: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``cloudpickle==`` the version that pickled a PythonModel, unless the model says otherwise.

    MLflow records it in MLmodel; models logged with explicit ``pip_requirements`` often
    leave it out of requirements.txt, and then any cloudpickle would be locked (MLflow
    warns at load time when the versions differ; pickles are not guaranteed to load across
    them).
    """
    version = spec.pyfunc.cloudpickle_version
    if not version or not spec.pyfunc.python_model:
        return []
    if any(canonicalize_name(Requirement(text).name) == "cloudpickle" for text, _ in requirements):
        return []
    return [(f"cloudpickle=={version}", f"MLmodel flavors.{PYFUNC}.cloudpickle_version")]


def _swap_for_skinny(spec: ModelSpec, requirements: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``mlflow==X`` becomes ``mlflow-skinny==X`` plus what loading the model needs."""
    loader = spec.pyfunc.loader_module
    if loader not in SKINNY_LOADERS:
        raise UnsupportedRequirementError(
            f"--mlflow-skinny is verified only for {', '.join(sorted(SKINNY_LOADERS))}; this "
            f"model loads with {loader}",
            hint="lock without --mlflow-skinny (full mlflow)",
        )
    swapped: list[tuple[str, str]] = []
    for text, where in requirements:
        req = Requirement(text)
        if canonicalize_name(req.name) != "mlflow":
            swapped.append((text, where))
            continue
        marker = f"; {req.marker}" if req.marker else ""
        swapped.append(
            (f"mlflow-skinny{req.specifier}{marker}", f"{where}, mlflow swapped for mlflow-skinny")
        )
        swapped += [(extra, "the mlflow-skinny swap (pyfunc loading)") for extra in SKINNY_EXTRAS]
    return swapped


def _locate_wheel(spec: ModelSpec, line: RequirementLine, options: IndexOptions) -> Path:
    written = line.path or ""
    if line.exists_in_model:
        return (spec.path / PurePosixPath(line.file).parent / written).resolve()
    candidate = Path(written).expanduser()
    if line.absolute_path and candidate.is_file():
        return candidate
    name = PurePosixPath(written).name
    for directory in options.wheel_dirs:
        if (directory / name).is_file():
            return directory / name
    searched = ", ".join(str(d) for d in options.wheel_dirs) or "no --wheel-dir given"
    raise MissingWheelError(
        f"{line.file}:{line.line_no} requires the wheel {written}, which does not exist here "
        f"(searched: {searched})",
        hint=f"copy {name} into a directory and pass --wheel-dir DIR (MLflow writes such "
        "paths for wheels that lived on the machine that logged the model, e.g. /dbfs/…)",
    )


def _wheel_pin(path: Path, where: str) -> str:
    """``name==version`` for a wheel file."""
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as err:
        raise UnsupportedRequirementError(
            f"{where}: {path.name} is not a valid wheel name"
        ) from err
    return f"{name}=={version}"


def _relative_to(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _find_links_dir(spec: ModelSpec, line: RequirementLine) -> Path:
    value = line.url or ""
    candidate = (spec.path / value) if not value.startswith("/") else Path(value)
    if candidate.is_dir():
        return candidate
    raise UnsupportedRequirementError(
        f"{line.file}:{line.line_no}: --find-links {value} is not a directory here",
        hint="pass the directory with --wheel-dir instead",
    )


# How to give an index's credentials. Written without a scheme: error output is scrubbed
# of every URL's user info, and an example URL with USER:TOKEN in it would lose it.
HOW_TO_AUTHENTICATE = (
    "--extra-index-url (or --index-url) with USER:TOKEN@ before the host, or the same URL "
    "in PIP_EXTRA_INDEX_URL (PIP_INDEX_URL), or a 'machine HOST login USER password TOKEN' "
    "line in ~/.netrc (or the file NETRC names)"
)


def _direct_url_hint(line: RequirementLine, file_name: str) -> str:
    if file_name.endswith(".whl"):
        return (
            f"download {file_name} yourself (check it is the file you expect), put it in a "
            "directory and pass --wheel-dir DIR: it is locked by its hash like the model's "
            f"own wheels; or publish it to a package index and log the model requiring "
            f"{line.name}==VERSION (pass the index with --extra-index-url)"
        )
    return (
        f"build {line.name} into a wheel and publish it to a package index, then log the "
        f"model requiring {line.name}==VERSION (pass the index with --extra-index-url); or "
        "log the model with the wheel inside it (mlflow's add_libraries_to_model puts it in "
        "wheels/)"
    )


def _index_given(url: str, options: IndexOptions) -> bool:
    """The user gave this index (same host and path) in the options, or its host in netrc."""
    wanted = index_key(url)
    if any(
        candidate and index_key(candidate) == wanted
        for candidate in (options.index_url, *options.extra_index_urls)
    ):
        return True
    # uv and pip read NETRC, else ~/.netrc, for hosts the URL gives no credentials for.
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(wanted[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _with_credentials(url: str | None, options: IndexOptions) -> str | None:
    """The user's credentialed URL for the same index (same host and path), if any."""
    if url is None:
        return None
    wanted = index_key(url)
    for candidate in (options.index_url, *options.extra_index_urls):
        if candidate and index_key(candidate) == wanted:
            return candidate
    return url


def index_key(url: str) -> tuple[str, str]:
    """What identifies an index whatever its credentials: host and path."""
    parts = urlsplit(url)
    return (parts.hostname or "", parts.path.rstrip("/"))
