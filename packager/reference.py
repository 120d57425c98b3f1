"""Parse the model reference a user types into a typed :class:`ModelReference`.

Parsing is pure (no network, no MLflow import) so every form can be tested alone; the
``source`` stage turns a reference into files. Accepted forms (see
``shared/reference/mlflow-model-format.md``)::

    models:/NAME/VERSION        models:/NAME@ALIAS
    models:/NAME/STAGE          (Production, Staging, Archived, None; any case)
    models:/NAME/latest         models:/m-<model_id>
    runs:/RUN_ID/PATH           a local directory holding an MLmodel file (or file://DIR)
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from packager.errors import UsageError

STAGES = ("None", "Staging", "Production", "Archived")
_STAGE_BY_LOWER = {stage.lower(): stage for stage in STAGES}
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-fA-F]{8,}$")
_RUN_ID = re.compile(r"^[0-9a-zA-Z_-]+$")

FORMS_HELP = (
    "models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/STAGE "
    "(Production|Staging|Archived|None), models:/NAME/latest, models:/m-<model_id>, "
    "runs:/RUN_ID/PATH, or a local directory containing an MLmodel file"
)


class RefKind(str, enum.Enum):
    """How a reference selects a model; also recorded as "reached through" in provenance."""

    VERSION = "version"
    ALIAS = "alias"
    STAGE = "stage"
    LATEST = "latest"
    LOGGED_MODEL = "logged_model"
    RUN = "run"
    LOCAL = "local"


@dataclass(frozen=True, kw_only=True)
class ModelReference:
    """A parsed model reference. Exactly the fields its ``kind`` needs are set."""

    raw: str
    kind: RefKind
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    stage: str | None = None
    model_id: str | None = None
    run_id: str | None = None
    artifact_path: str | None = None
    local_path: Path | None = None

    @property
    def needs_registry(self) -> bool:
        return self.kind not in (RefKind.LOCAL,)

    def uri(self) -> str:
        """The canonical MLflow URI of this reference (the local path for local models)."""
        forms = {
            RefKind.VERSION: f"models:/{self.name}/{self.version}",
            RefKind.ALIAS: f"models:/{self.name}@{self.alias}",
            RefKind.STAGE: f"models:/{self.name}/{self.stage}",
            RefKind.LATEST: f"models:/{self.name}/latest",
            RefKind.LOGGED_MODEL: f"models:/{self.model_id}",
            RefKind.RUN: f"runs:/{self.run_id}/{self.artifact_path}",
            RefKind.LOCAL: str(self.local_path),
        }
        return forms[self.kind]


def parse_reference(text: str, *, cwd: Path | None = None) -> ModelReference:
    """Parse ``text`` or raise :class:`UsageError` naming the accepted forms."""
    raw = text.strip()
    if not raw:
        raise UsageError("empty model reference", hint=f"pass one of: {FORMS_HELP}")
    if raw.startswith("models:"):
        return _parse_models_uri(raw)
    if raw.startswith("runs:"):
        return _parse_runs_uri(raw)
    if raw.startswith("file://"):
        return _local(raw, Path(raw[len("file://") :]), cwd)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", raw):
        scheme = raw.split(":", 1)[0]
        raise UsageError(
            f"unsupported model reference scheme {scheme!r} in {raw!r}",
            hint=f"register the model and pass models:/NAME/VERSION, or pass one of: {FORMS_HELP}",
        )
    return _local(raw, Path(raw), cwd)


def _parse_models_uri(raw: str) -> ModelReference:
    if raw.startswith("models://"):
        raise UsageError(
            f"{raw!r}: models:// URIs with a profile or workspace are not supported",
            hint="select the registry with --registry-uri or MLFLOW_REGISTRY_URI and pass "
            "models:/NAME/VERSION",
        )
    body = raw[len("models:/") :] if raw.startswith("models:/") else raw[len("models:") :]
    body = body.strip("/")
    if _LOGGED_MODEL_ID.match(body):
        return ModelReference(raw=raw, kind=RefKind.LOGGED_MODEL, model_id=body)
    if "/" not in body and "@" in body:
        name, _, alias = body.rpartition("@")
        if not name or not alias:
            raise _bad_models_uri(raw, "an alias needs a model name before '@' and a name after")
        return ModelReference(raw=raw, kind=RefKind.ALIAS, name=name, alias=alias)
    parts = body.split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise _bad_models_uri(raw, "expected exactly a model name and a version, stage or alias")
    name, suffix = parts
    if "@" in name:
        raise _bad_models_uri(raw, "an alias reference has no '/…' after it")
    if suffix.isdigit():
        if int(suffix) < 1:
            raise _bad_models_uri(raw, "model versions start at 1")
        return ModelReference(raw=raw, kind=RefKind.VERSION, name=name, version=str(int(suffix)))
    if suffix.lower() == "latest":
        return ModelReference(raw=raw, kind=RefKind.LATEST, name=name)
    stage = _STAGE_BY_LOWER.get(suffix.lower())
    if stage is not None:
        return ModelReference(raw=raw, kind=RefKind.STAGE, name=name, stage=stage)
    raise _bad_models_uri(
        raw, f"{suffix!r} is neither a version number, 'latest', nor a stage ({', '.join(STAGES)})"
    )


def _bad_models_uri(raw: str, why: str) -> UsageError:
    return UsageError(f"malformed model reference {raw!r}: {why}", hint=f"use one of: {FORMS_HELP}")


def _parse_runs_uri(raw: str) -> ModelReference:
    body = raw[len("runs:") :].lstrip("/")
    run_id, _, path = body.partition("/")
    path = path.strip("/")
    if not run_id or not _RUN_ID.match(run_id) or not path:
        raise UsageError(
            f"malformed run reference {raw!r}: expected runs:/RUN_ID/PATH",
            hint="PATH is the name the model was logged under, e.g. runs:/<run_id>/model",
        )
    return ModelReference(raw=raw, kind=RefKind.RUN, run_id=run_id, artifact_path=path)


def _local(raw: str, path: Path, cwd: Path | None) -> ModelReference:
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    if not path.exists():
        raise UsageError(
            f"{raw!r} is not a model reference and no such directory exists",
            hint=f"pass one of: {FORMS_HELP}",
        )
    if not path.is_dir():
        raise UsageError(
            f"{raw!r} is a file, not a model directory",
            hint="pass the directory that contains the MLmodel file",
        )
    return ModelReference(raw=raw, kind=RefKind.LOCAL, local_path=path.resolve())
