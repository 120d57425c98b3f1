"""Stage 1, ``source``: resolve a model reference through MLflow and fetch its files.

This is the one module that talks to MLflow's client. Input: a :class:`ModelReference`;
output: a :class:`SourcedModel` (a complete local model directory, its per-file hashes and
its :class:`Provenance`). Registry look-ups always run (aliases and stages move); the
download is cached by content (:mod:`packager.cache`) and reused for the same version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from packager.cache import ModelCache
from packager.digest import FileEntry, LinkPolicy, manifest, tree_digest
from packager.errors import (
    DownloadError,
    ModelFormatError,
    ModelNotFoundError,
    PackagerError,
    RegistryAuthError,
    RegistryUnreachableError,
    UsageError,
)
from packager.progress import NullProgress, Progress
from packager.redact import redact_uri, scrub
from packager.reference import ModelReference, RefKind
from packager.render import value_problem

log = logging.getLogger(__name__)

T = TypeVar("T")
_PROBE_TIMEOUT_SECONDS = 5.0
_DOWNLOAD_THREADS = 4
_LISTED_NAMES = 20
# The longest registered model name MLflow's SQL store holds (its `name` column).
MAX_NAME_LENGTH = 256


@dataclass(frozen=True, kw_only=True)
class RegistryOptions:
    """Where to look (``None`` falls back to MLflow's environment variables), and what a
    local model directory may contain (see :func:`packager.digest.walk_files`)."""

    tracking_uri: str | None = None
    registry_uri: str | None = None
    outside_links: LinkPolicy = "error"


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where a model came from. Every URI in it is stripped of credentials."""

    reference: str
    reached_through: RefKind
    tracking_uri: str | None = None
    registry_uri: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    alias: str | None = None  # the alias the reference named
    stage: str | None = None  # the stage the reference named
    current_stage: str | None = None
    aliases: tuple[str, ...] = ()  # every alias pointing at this version now
    run_id: str | None = None
    model_id: str | None = None
    source: str | None = None  # the version's source URI as registered
    storage_uri: str | None = None  # where the files were downloaded from
    created_at: str | None = None  # ISO 8601, UTC
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    description: str | None = None
    mlflow_version: str | None = None  # the MLflow that logged the model (from MLmodel)
    content_digest: str = ""


@dataclass(frozen=True, kw_only=True)
class SourcedModel:
    """A complete model directory on local disk and what we know of its origin."""

    path: Path
    files: tuple[FileEntry, ...]
    provenance: Provenance
    from_cache: bool


@dataclass(frozen=True, kw_only=True)
class _Resolved:
    """Registry metadata plus the URI the files live at."""

    artifact_uri: str
    identity: str
    provenance: Provenance


# -- public entry point ---------------------------------------------------------------


def fetch_model(
    ref: ModelReference,
    *,
    options: RegistryOptions | None = None,
    cache: ModelCache | None = None,
    progress: Progress | None = None,
) -> SourcedModel:
    """Resolve ``ref`` and return its files, downloading them unless already cached."""
    options = options or RegistryOptions()
    if ref.kind is RefKind.LOCAL:
        return _local_model(ref, options.outside_links)
    tracking_uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise UsageError(
            f"{ref.raw!r} needs an MLflow tracking server, and none is configured",
            hint="set MLFLOW_TRACKING_URI or pass --tracking-uri (e.g. http://mlflow:5000 or "
            "sqlite:///mlflow.db)",
        )
    registry_uri = options.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    cache = cache or ModelCache()
    # A registered version, a logged model and a run's artifacts never change: once seen,
    # they are served from the cache without the registry (offline, and without importing
    # MLflow). Aliases, stages and "latest" move, so they are always asked for.
    reference_key = _reference_key(ref, tracking_uri, registry_uri)
    if reference_key is not None:
        recalled = cache.recall(reference_key)
        if recalled is not None:
            seen, record = recalled
            log.info("using cached %s (%s)", ref.raw, seen.digest[:19])
            return SourcedModel(
                path=seen.path,
                files=seen.files,
                provenance=_with_content(
                    _provenance_from_record(record, ref), seen.path, seen.digest
                ),
                from_cache=True,
            )
    _check_reachable(tracking_uri)
    if registry_uri != tracking_uri:
        _check_reachable(registry_uri)
    resolver = _Resolver(tracking_uri=tracking_uri, registry_uri=registry_uri)
    resolved = resolver.resolve(ref)
    cached = cache.lookup(resolved.identity)
    if cached is not None:
        log.info("using cached %s (%s)", ref.raw, cached.digest[:19])
    else:
        log.info("downloading %s from %s", ref.raw, redact_uri(resolved.artifact_uri))
        cached = cache.store(
            resolved.identity,
            lambda dest: resolver.download(
                resolved.artifact_uri, dest, ref.raw, progress or NullProgress()
            ),
        )
    provenance = _with_content(resolved.provenance, cached.path, cached.digest)
    if reference_key is not None:
        cache.remember(reference_key, resolved.identity, _record(resolved.provenance))
    return SourcedModel(
        path=cached.path, files=cached.files, provenance=provenance, from_cache=cached.reused
    )


def _reference_key(ref: ModelReference, tracking_uri: str, registry_uri: str) -> str | None:
    if ref.kind in (RefKind.VERSION, RefKind.LOGGED_MODEL, RefKind.RUN):
        return "|".join((redact_uri(tracking_uri), redact_uri(registry_uri), ref.uri()))
    return None


def _record(provenance: Provenance) -> dict[str, object]:
    data = {f.name: getattr(provenance, f.name) for f in fields(Provenance)}
    data["reached_through"] = provenance.reached_through.value
    data["tags"] = dict(provenance.tags)
    data["aliases"] = list(provenance.aliases)
    return data


def _provenance_from_record(record: dict[str, object], ref: ModelReference) -> Provenance:
    known = {f.name for f in fields(Provenance)}
    data: dict[str, Any] = {k: v for k, v in record.items() if k in known}
    data.update(
        reference=ref.raw,
        reached_through=ref.kind,
        tags=MappingProxyType(dict(data.get("tags") or {})),
        aliases=tuple(data.get("aliases") or ()),
    )
    return Provenance(**data)


# -- local directories ----------------------------------------------------------------


def _local_model(ref: ModelReference, outside_links: LinkPolicy) -> SourcedModel:
    assert ref.local_path is not None  # set by parse_reference for LOCAL  # noqa: S101
    path = ref.local_path
    if not (path / "MLmodel").is_file():
        raise ModelFormatError(
            f"{path} has no MLmodel file, so it is not an MLflow model directory",
            hint="pass the directory mlflow.<flavor>.save_model wrote, or download the model "
            "with `mlflow artifacts download`",
        )
    files = manifest(path, outside_links=outside_links)
    meta = _registered_model_meta(path)
    provenance = Provenance(
        reference=ref.raw,
        reached_through=RefKind.LOCAL,
        model_name=meta.get("model_name"),
        model_version=meta.get("model_version"),
        source=str(path),
        storage_uri=path.as_uri(),
    )
    return SourcedModel(
        path=path,
        files=files,
        provenance=_with_content(provenance, path, tree_digest(files)),
        from_cache=False,
    )


def _registered_model_meta(path: Path) -> dict[str, str]:
    """MLflow writes ``registered_model_meta`` when it downloads a models:/ URI.

    Its values become image labels and the server's model name, so they are held to what a
    registry allows: one line of UTF-8, at most :data:`MAX_NAME_LENGTH` characters.
    """
    meta = path / "registered_model_meta"
    try:
        data = yaml.safe_load(meta.read_bytes().decode("utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    except UnicodeDecodeError as err:
        raise ModelFormatError(
            f"{meta} is not UTF-8 text (byte {err.start}: {err.reason})",
            hint="rewrite the file as UTF-8 YAML with model_name and model_version, or delete it",
        ) from err
    if not isinstance(data, dict):
        return {}
    found = {k: str(v) for k, v in data.items() if k in ("model_name", "model_version")}
    for key, value in found.items():
        problem = value_problem(value, MAX_NAME_LENGTH)
        if problem:
            raise ModelFormatError(
                f"{meta}: {key} {problem}",
                hint="a registered model's name is one line of at most "
                f"{MAX_NAME_LENGTH} characters; fix or delete the file",
            )
    return found


def _with_content(provenance: Provenance, path: Path, digest: str) -> Provenance:
    mlflow_version, model_id = None, provenance.model_id
    # A damaged MLmodel is read_spec's to report, with the file and the reason.
    with contextlib.suppress(OSError, ValueError, yaml.YAMLError, AttributeError):
        data = yaml.safe_load((path / "MLmodel").read_text(encoding="utf-8"))
        mlflow_version = str(data["mlflow_version"]) if data.get("mlflow_version") else None
        # An MLflow 3 model records its logged model id; the registry may not say it.
        model_id = model_id or (str(data["model_id"]) if data.get("model_id") else None)
    return replace(
        provenance, content_digest=digest, mlflow_version=mlflow_version, model_id=model_id
    )


# -- reachability ---------------------------------------------------------------------


def _check_reachable(uri: str) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when a server is down."""
    parts = urlsplit(uri)
    shown = redact_uri(uri)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_SECONDS):
                pass
        except OSError as err:
            raise RegistryUnreachableError(
                f"cannot reach the MLflow tracking server at {shown}: "
                f"{err.strerror or err.__class__.__name__}",
                hint="check that the server is running and that MLFLOW_TRACKING_URI / "
                "--tracking-uri point at it (behind a proxy, set HTTPS_PROXY)",
            ) from err
    elif parts.scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        # MLflow would silently create an empty database; a typo must not look like
        # "model not found" in a brand-new registry.
        if db is not None and str(db) != ":memory:" and not db.is_file():
            raise RegistryUnreachableError(
                f"the registry database {db} does not exist",
                hint="check the path in MLFLOW_TRACKING_URI / --tracking-uri "
                "(sqlite:///relative.db or sqlite:////absolute/path.db)",
            )


# -- resolution -----------------------------------------------------------------------


class _Resolver:
    """MLflow client calls, each translated into packager's errors."""

    def __init__(self, *, tracking_uri: str, registry_uri: str) -> None:
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 - heavy import, only here

        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)

    def resolve(self, ref: ModelReference) -> _Resolved:
        if ref.kind is RefKind.LOGGED_MODEL:
            return self._logged_model(ref)
        if ref.kind is RefKind.RUN:
            return self._run(ref)
        return self._model_version(ref)

    # each kind --------------------------------------------------------------------

    def _model_version(self, ref: ModelReference) -> _Resolved:
        name, version, alias = ref.name or "", ref.version or "", ref.alias or ""
        if ref.kind is RefKind.VERSION:
            mv = self._call(
                lambda: self.client.get_model_version(name, version),
                not_found=lambda: self._not_found(name, f"version {ref.version}"),
            )
        elif ref.kind is RefKind.ALIAS:
            mv = self._call(
                lambda: self.client.get_model_version_by_alias(name, alias),
                not_found=lambda: self._not_found(name, f"alias @{ref.alias}"),
            )
        else:
            # Search results lack aliases (and on some servers tags): fetch the version whole.
            chosen = str(self._latest(name, ref.stage).version)
            mv = self._call(
                lambda: self.client.get_model_version(name, chosen),
                not_found=lambda: self._not_found(name, f"version {chosen}"),
            )
        version = str(mv.version)
        download_uri = self._call(
            lambda: self.client.get_model_version_download_uri(name, version),
            not_found=lambda: self._not_found(name, f"version {version}"),
        )
        created = _iso(mv.creation_timestamp)
        registry = redact_uri(self.registry_uri)
        provenance = Provenance(
            reference=ref.raw,
            reached_through=ref.kind,
            tracking_uri=redact_uri(self.tracking_uri),
            registry_uri=registry,
            model_name=name,
            model_version=version,
            alias=ref.alias,
            stage=ref.stage,
            current_stage=getattr(mv, "current_stage", None) or None,
            aliases=tuple(sorted(getattr(mv, "aliases", None) or ())),
            run_id=mv.run_id or None,
            model_id=getattr(mv, "model_id", None) or None,
            source=redact_uri(mv.source) if mv.source else None,
            storage_uri=redact_uri(download_uri),
            created_at=created,
            tags=MappingProxyType(dict(sorted((mv.tags or {}).items()))),
            description=mv.description or None,
        )
        identity = "|".join(
            ("model_version", registry, name, version, str(mv.source), str(mv.creation_timestamp))
        )
        return _Resolved(artifact_uri=download_uri, identity=identity, provenance=provenance)

    def _latest(self, name: str, stage: str | None) -> Any:
        versions = self._versions(name)
        if stage is not None:
            versions = [v for v in versions if (v.current_stage or "None") == stage]
        if not versions:
            what = f"version in stage {stage}" if stage else "versions"
            raise self._not_found(name, what)
        return max(versions, key=lambda v: int(v.version))

    def _versions(self, name: str) -> list[Any]:
        escaped = name.replace("'", "\\'")
        found = self._call(
            lambda: self.client.search_model_versions(f"name='{escaped}'"),
            not_found=lambda: self._not_found(name, "versions"),
        )
        return list(found)

    def _logged_model(self, ref: ModelReference) -> _Resolved:
        model_id = ref.model_id or ""
        model = self._call(
            lambda: self.client.get_logged_model(model_id),
            not_found=lambda: ModelNotFoundError(
                f"logged model {model_id} does not exist on {redact_uri(self.tracking_uri)}",
                hint="copy the id from the model's page or from ModelInfo.model_id; "
                "registered versions are models:/NAME/VERSION",
            ),
        )
        tags = {k: v for k, v in (model.tags or {}).items() if not k.startswith("mlflow.")}
        provenance = Provenance(
            reference=ref.raw,
            reached_through=ref.kind,
            tracking_uri=redact_uri(self.tracking_uri),
            model_name=model.name or None,
            run_id=model.source_run_id or None,
            model_id=model_id,
            source=f"models:/{model_id}",
            storage_uri=redact_uri(model.artifact_location),
            created_at=_iso(model.creation_timestamp),
            tags=MappingProxyType(dict(sorted(tags.items()))),
        )
        identity = "|".join(
            ("logged_model", redact_uri(self.tracking_uri), model_id, str(model.creation_timestamp))
        )
        return _Resolved(
            artifact_uri=model.artifact_location, identity=identity, provenance=provenance
        )

    def _run(self, ref: ModelReference) -> _Resolved:
        """``runs:/RUN/PATH``: the run's own artifacts (MLflow 2.x), else the logged model
        named PATH that the run produced (MLflow 3 stores models outside run artifacts)."""
        run_id, path = ref.run_id or "", ref.artifact_path or ""
        where = redact_uri(self.tracking_uri)
        run = self._call(
            lambda: self.client.get_run(run_id),
            not_found=lambda: ModelNotFoundError(
                f"run {run_id} does not exist on {where}",
                hint="check the run id (32 hex characters) and the tracking URI",
            ),
        )
        artifact_uri, model_id = None, None
        # The run's own artifact store, not client.list_artifacts: in MLflow 3 the latter
        # also lists the run's logged models under their names, at another location.
        own = self._repo(run.info.artifact_uri)
        listed = self._call(lambda: own.list_artifacts(path), not_found=list)
        if any(info.path.rsplit("/", 1)[-1] == "MLmodel" for info in listed):
            artifact_uri = f"{run.info.artifact_uri.rstrip('/')}/{path}"
        else:
            models = self._run_models(run)
            match = next((m for m in models if m.name == path), None)
            if match is None:
                top = sorted(
                    i.path for i in self._call(lambda: own.list_artifacts(""), not_found=list)
                )
                names = sorted({m.name for m in models})
                raise ModelNotFoundError(
                    f"run {run_id} has no model at {path!r} on {where}",
                    hint=f"models logged by this run: {', '.join(names) or 'none'}; "
                    f"run artifacts: {', '.join(top) or 'none'}",
                )
            artifact_uri, model_id = match.artifact_location, match.model_id
        provenance = Provenance(
            reference=ref.raw,
            reached_through=ref.kind,
            tracking_uri=where,
            run_id=run_id,
            model_id=model_id,
            source=f"runs:/{run_id}/{path}",
            storage_uri=redact_uri(artifact_uri),
            created_at=_iso(run.info.start_time),
        )
        identity = "|".join(("run", where, run_id, path, str(model_id)))
        return _Resolved(artifact_uri=artifact_uri, identity=identity, provenance=provenance)

    def _run_models(self, run: Any) -> list[Any]:
        """Logged models whose source run is ``run``."""
        found: list[Any] = []
        token: str | None = None

        def page_at(token: str | None) -> Any:
            return self.client.search_logged_models(
                experiment_ids=[run.info.experiment_id], page_token=token
            )

        while True:
            page = self._call(lambda: page_at(token), not_found=list)  # noqa: B023 - called now
            found += [m for m in page if m.source_run_id == run.info.run_id]
            token = getattr(page, "token", None)
            if not token:
                return found

    # errors -----------------------------------------------------------------------

    def _not_found(self, name: str, what: str) -> ModelNotFoundError:
        """Say what does exist: the model's versions and aliases, or other model names."""
        where = redact_uri(self.registry_uri)
        try:
            model = self.client.get_registered_model(name)
        except Exception as err:  # noqa: BLE001 - any failure here means "no such model"
            if not _is_not_found(err):
                return ModelNotFoundError(f"registered model {name!r}: {what} not found on {where}")
            names = sorted(
                m.name for m in self.client.search_registered_models(max_results=_LISTED_NAMES + 1)
            )
            listing = ", ".join(names[:_LISTED_NAMES]) or "none"
            if len(names) > _LISTED_NAMES:
                listing += ", …"
            return ModelNotFoundError(
                f"registered model {name!r} does not exist on {where}",
                hint=f"registered models there: {listing}",
            )
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (getattr(model, "aliases", None) or {}).items():
            aliases_by_version.setdefault(str(version), []).append(f"@{alias}")
        rows = []
        for mv in sorted(self._versions(name), key=lambda v: int(v.version)):
            notes = [mv.current_stage] if mv.current_stage not in (None, "", "None") else []
            notes += sorted(aliases_by_version.get(str(mv.version), []))
            rows.append(f"{mv.version} ({', '.join(notes)})" if notes else str(mv.version))
        return ModelNotFoundError(
            f"registered model {name!r} has no {what} on {where}",
            hint=f"versions: {', '.join(rows) or 'none'}; aliases: "
            f"{', '.join(sorted('@' + a for a in (model.aliases or {}))) or 'none'}",
        )

    def _call(self, fn: Callable[[], T], *, not_found: Callable[[], PackagerError | T]) -> T:
        """Run an MLflow call; "does not exist" becomes ``not_found()`` (raised if it is an
        error, returned otherwise), anything else a packager error."""
        try:
            return fn()
        except PackagerError:
            raise
        except Exception as err:
            if _is_not_found(err):
                fallback = not_found()
                if isinstance(fallback, PackagerError):
                    raise fallback from err
                return fallback
            raise self._translate(err) from err

    def _translate(self, err: Exception) -> PackagerError:
        text = scrub(str(err))
        code = getattr(err, "error_code", "")
        where = redact_uri(self.tracking_uri)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or any(
            s in text for s in (" 401", " 403", "Unauthorized", "Forbidden")
        ):
            return RegistryAuthError(
                f"{where} refused our credentials: {_first_line(text)}",
                hint="set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (Databricks: DATABRICKS_HOST/DATABRICKS_TOKEN)",
            )
        if any(
            s in text
            for s in (
                "Max retries",
                "Connection refused",
                "ConnectionError",
                "Name or service not known",
                "timed out",
            )
        ):
            return RegistryUnreachableError(
                f"lost the connection to {where}: {_first_line(text)}",
                hint="check the server and the network, then run the command again",
            )
        return PackagerError(f"MLflow request to {where} failed: {_first_line(text)}")

    # download ---------------------------------------------------------------------

    def _repo(self, artifact_uri: str) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import (  # noqa: PLC0415
            get_artifact_repository,
        )

        return get_artifact_repository(
            artifact_uri, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )

    def download(self, artifact_uri: str, dest: Path, label: str, progress: Progress) -> None:
        """Download every file under ``artifact_uri`` into ``dest`` and check sizes."""
        repo = self._repo(artifact_uri)
        files = self._call(
            lambda: list(_walk(repo, "")),
            not_found=lambda: DownloadError(f"no artifacts at {redact_uri(artifact_uri)}"),
        )
        shown = redact_uri(artifact_uri)
        if not any(path == "MLmodel" for path, _ in files):
            raise ModelFormatError(
                f"{label} resolved to {shown}, which has no MLmodel file: not an MLflow model"
                if files
                else f"{label} resolved to {shown}, which holds no files",
                hint="for runs:/ references, PATH is the name the model was logged under",
            )
        dest.mkdir(parents=True)
        progress.start(
            f"downloading {label}",
            total_bytes=sum(s or 0 for _, s in files),
            total_files=len(files),
        )

        def fetch_one(path: str, size: int | None) -> None:
            local = Path(repo.download_artifacts(path, dst_path=str(dest)))
            actual = local.stat().st_size
            if size is not None and actual != size:
                raise DownloadError(
                    f"{path}: got {actual} bytes from {shown}, the server listed {size}",
                    hint="the transfer was cut short; run the command again",
                )
            progress.advance(actual)

        def one(item: tuple[str, int | None]) -> None:
            path, size = item
            self._call(
                lambda: fetch_one(path, size),
                not_found=lambda: DownloadError(
                    f"{path} vanished from {shown} during the download"
                ),
            )

        try:
            with ThreadPoolExecutor(max_workers=_DOWNLOAD_THREADS) as pool:
                list(pool.map(one, files))
        finally:
            progress.finish()


def _walk(repo: Any, path: str) -> Iterator[tuple[str, int | None]]:
    for info in repo.list_artifacts(path):
        if info.is_dir:
            yield from _walk(repo, info.path)
        else:
            yield info.path, info.file_size


def _is_not_found(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    text = str(err)
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "RESOURCE_DOES_NOT_EXIST" in text:
        return True
    # A missing alias is INVALID_PARAMETER_VALUE "Registered model alias X not found".
    return code == "INVALID_PARAMETER_VALUE" and "not found" in text.lower()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _iso(millis: int | None) -> str | None:
    if not millis:
        return None
    return (
        datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
