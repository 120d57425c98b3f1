"""Read MLmodel and the files around it into a :class:`ModelSpec`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from packager.digest import FileEntry, manifest, subtree, tree_digest
from packager.errors import ModelFormatError, NotServableError
from packager.redact import redact_uri
from packager.spec.environment import (
    ENV_FILE_NAMES,
    CondaEnv,
    EnvFile,
    PythonEnv,
    WheelsDir,
    read_conda_env,
    read_python_env,
    read_wheels,
)
from packager.spec.requirements import (
    LineKind,
    RequirementLine,
    files_included_by,
    read_requirements,
)
from packager.spec.signature import Signature, parse_signature

PYFUNC = "python_function"


@dataclass(frozen=True, kw_only=True)
class Flavor:
    name: str
    version: str | None  # the library version the flavor records (sklearn_version, …)
    serialization_format: str | None  # cloudpickle, pickle, skops, …
    model_file: str | None  # pickled_model / data
    # Directories the flavor loads whole, each shipped in an image layer of its own (OCI
    # backend): transformers' weights (``model_binary``) and its components (tokenizer,
    # processor) under ``components/``, so a new version that changes one of them leaves the
    # others' layers cached (issue 18).
    layer_dirs: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PyfuncFlavor:
    loader_module: str
    python_version: str | None
    code: str | None
    data: str | None
    conda_env: str | None
    virtualenv_env: str | None
    python_model: str | None
    cloudpickle_version: str | None
    model_code_path: str | None
    model_config: str | None  # JSON
    streamable: bool | None


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A PythonModel artifact (``context.artifacts[name]``)."""

    name: str
    path: str  # relative to the model directory
    kind: Literal["file", "directory"]
    size: int
    files: int
    sha256: str  # of the file, or the tree digest of the directory
    logged_from: str | None  # MLmodel's `uri`, credentials stripped


@dataclass(frozen=True, kw_only=True)
class CodeEntry:
    """One ``code_paths`` entry, copied by MLflow to ``code/<basename>``."""

    path: str
    kind: Literal["file", "directory"]
    size: int
    files: int


@dataclass(frozen=True, kw_only=True)
class InputExample:
    path: str | None
    type: str | None
    serving_input_path: str | None
    present: bool  # the example files exist in the model directory


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the later stages need to know about one model directory."""

    path: Path
    mlflow_version: str | None
    flavors: tuple[Flavor, ...]
    pyfunc: PyfuncFlavor
    python_version: str
    python_version_from: str  # which file said so
    env_files: tuple[EnvFile, ...]
    requirements: tuple[RequirementLine, ...]
    python_env: PythonEnv | None
    conda: CondaEnv | None
    wheels: WheelsDir | None
    code: tuple[CodeEntry, ...]
    artifacts: tuple[Artifact, ...]
    signature: Signature | None
    input_example: InputExample | None
    serialization_formats: tuple[str, ...]
    needs_skops: bool
    model_size_bytes: int | None  # as MLmodel records it
    size_on_disk: int
    file_count: int
    run_id: str | None
    model_id: str | None
    model_uuid: str | None
    utc_time_created: str | None
    env_vars: tuple[str, ...]
    # Every file, as the source stage found it (links resolved, see digest.walk_files).
    files: tuple[FileEntry, ...] = ()
    # Every file pip would read as requirements (followed through -r/-c), by relative path.
    requirement_files: frozenset[str] = frozenset()

    @property
    def python_minor(self) -> str:
        """``3.11`` for ``3.11.7``."""
        return ".".join(self.python_version.split(".")[:2])

    @property
    def local_wheel_lines(self) -> tuple[RequirementLine, ...]:
        return tuple(r for r in self.requirements if r.kind is LineKind.LOCAL_WHEEL)

    @property
    def missing_local_wheels(self) -> tuple[RequirementLine, ...]:
        """Wheel paths the model names but does not contain (e.g. ``/dbfs/…/lib.whl``)."""
        return tuple(r for r in self.local_wheel_lines if not r.exists_in_model)

    @property
    def index_lines(self) -> tuple[RequirementLine, ...]:
        kinds = (LineKind.INDEX_URL, LineKind.EXTRA_INDEX_URL, LineKind.FIND_LINKS)
        return tuple(r for r in self.requirements if r.kind in kinds)


def read_spec(model_dir: Path, files: tuple[FileEntry, ...] | None = None) -> ModelSpec:
    """Parse ``model_dir``. ``files`` (from the source stage) avoids hashing files twice."""
    files = manifest(model_dir) if files is None else files
    mlmodel = _read_mlmodel(model_dir)
    flavors_raw = mlmodel.get("flavors")
    if not isinstance(flavors_raw, dict) or not flavors_raw:
        raise ModelFormatError(
            f"{model_dir / 'MLmodel'}: field 'flavors' is missing or empty",
            hint="the MLmodel file is damaged; log the model again",
        )
    flavors = tuple(_flavor(name, body) for name, body in sorted(flavors_raw.items()))
    pyfunc_raw = flavors_raw.get(PYFUNC)
    if not isinstance(pyfunc_raw, dict):
        names = ", ".join(f.name for f in flavors)
        raise NotServableError(
            f"{model_dir.name}: the model has no '{PYFUNC}' flavor (it has: {names}), so "
            "MLflow cannot load it with mlflow.pyfunc.load_model and a pyfunc server cannot "
            "serve it",
            hint="log it with a flavor that adds python_function (mlflow.sklearn, "
            "mlflow.pyfunc with a PythonModel, …) or wrap it in a PythonModel",
        )
    pyfunc = _pyfunc(pyfunc_raw)
    env_files = tuple(
        EnvFile(kind=ENV_FILE_NAMES[e.path], path=e.path, sha256=e.sha256)
        for e in files
        if e.path in ENV_FILE_NAMES
    )
    present = {e.path for e in files}
    for declared in (pyfunc.conda_env, pyfunc.virtualenv_env):
        if declared and declared not in present:
            raise ModelFormatError(
                f"MLmodel: flavors.{PYFUNC}.env names {declared}, which is not in the model",
                hint="the model was not uploaded completely; log it again",
            )
    python_env = (
        read_python_env(model_dir, "python_env.yaml") if "python_env.yaml" in present else None
    )
    conda = read_conda_env(model_dir, "conda.yaml") if "conda.yaml" in present else None
    python_version, python_from = _python_version(pyfunc, python_env, conda, model_dir)
    requirements, requirement_files = (
        read_requirements(model_dir, "requirements.txt")
        if "requirements.txt" in present
        else ((), frozenset[str]())
    )
    if python_env is not None:
        requirement_files |= files_included_by(
            model_dir, "python_env.yaml", python_env.dependencies + python_env.build_dependencies
        )
    if conda is not None:
        requirement_files |= files_included_by(model_dir, "conda.yaml", conda.pip)
    wheels_meta = mlmodel.get("wheels")
    wheels = read_wheels(
        files,
        str(wheels_meta.get("platform"))
        if isinstance(wheels_meta, dict) and wheels_meta.get("platform")
        else None,
    )
    formats = tuple(sorted({f.serialization_format for f in flavors if f.serialization_format}))
    return ModelSpec(
        path=model_dir,
        mlflow_version=_opt_str(mlmodel.get("mlflow_version")),
        flavors=flavors,
        pyfunc=pyfunc,
        python_version=python_version,
        python_version_from=python_from,
        env_files=env_files,
        requirements=requirements,
        python_env=python_env,
        conda=conda,
        wheels=wheels,
        code=_code_entries(pyfunc, files, model_dir),
        artifacts=_artifacts(pyfunc_raw, files),
        signature=parse_signature(mlmodel.get("signature")),
        input_example=_input_example(mlmodel.get("saved_input_example_info"), present),
        serialization_formats=formats,
        needs_skops="skops" in formats or any(e.path.endswith(".skops") for e in files),
        model_size_bytes=_opt_int(mlmodel.get("model_size_bytes")),
        size_on_disk=sum(e.size for e in files),
        file_count=len(files),
        run_id=_opt_str(mlmodel.get("run_id")),
        model_id=_opt_str(mlmodel.get("model_id")),
        model_uuid=_opt_str(mlmodel.get("model_uuid")),
        utc_time_created=_opt_str(mlmodel.get("utc_time_created")),
        env_vars=tuple(str(v) for v in mlmodel.get("env_vars") or ()),
        files=files,
        requirement_files=requirement_files,
    )


def _read_mlmodel(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "MLmodel"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ModelFormatError(
            f"{path} not found: this directory is not an MLflow model",
            hint="point at the directory that contains MLmodel",
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"cannot read {path}: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ModelFormatError(
            f"{path} is not valid YAML{where}",
            hint="the MLmodel file is damaged; log the model again",
        ) from err
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must be a YAML mapping with a 'flavors' field")
    return data


def _flavor(name: str, body: object) -> Flavor:
    body = body if isinstance(body, dict) else {}
    version = next(
        (
            str(v)
            for k, v in body.items()
            if k.endswith("_version") and k not in ("python_version", "cloudpickle_version") and v
        ),
        None,
    )
    return Flavor(
        name=name,
        version=version,
        serialization_format=_opt_str(body.get("serialization_format")),
        model_file=_opt_str(
            body.get("pickled_model") or body.get("data") or body.get("model_data")
        ),
        layer_dirs=_layer_dirs(name, body),
    )


def _layer_dirs(name: str, body: dict[str, Any]) -> tuple[str, ...]:
    """transformers' weights directory and ``components/<name>`` directories, as MLflow's
    transformers flavor writes them (``model_binary``, ``components``)."""
    if name != "transformers":
        return ()
    dirs = []
    binary = body.get("model_binary")
    if isinstance(binary, str) and binary.strip("/"):
        dirs.append(binary.strip("/"))
    components = body.get("components")
    if isinstance(components, list):
        dirs += [f"components/{c}" for c in components if isinstance(c, str) and c.strip("/")]
    return tuple(dict.fromkeys(dirs))


def _pyfunc(body: dict[str, Any]) -> PyfuncFlavor:
    loader = body.get("loader_module")
    if not loader or not isinstance(loader, str):
        raise ModelFormatError(
            f"MLmodel: flavors.{PYFUNC}.loader_module is missing",
            hint="the MLmodel file is damaged; log the model again",
        )
    env = body.get("env")
    conda_env = env.get("conda") if isinstance(env, dict) else env
    config = body.get("model_config")
    return PyfuncFlavor(
        loader_module=loader,
        python_version=_opt_str(body.get("python_version")),
        code=_opt_str(body.get("code")),
        data=_opt_str(body.get("data")),
        conda_env=_opt_str(conda_env),
        virtualenv_env=_opt_str(env.get("virtualenv")) if isinstance(env, dict) else None,
        python_model=_opt_str(body.get("python_model")),
        cloudpickle_version=_opt_str(body.get("cloudpickle_version")),
        model_code_path=_opt_str(body.get("model_code_path")),
        model_config=json.dumps(config, sort_keys=True, default=str) if config else None,
        streamable=body.get("streamable") if isinstance(body.get("streamable"), bool) else None,
    )


def _python_version(
    pyfunc: PyfuncFlavor, python_env: PythonEnv | None, conda: CondaEnv | None, model_dir: Path
) -> tuple[str, str]:
    for version, where in (
        (pyfunc.python_version, f"MLmodel flavors.{PYFUNC}.python_version"),
        (python_env.python if python_env else None, "python_env.yaml"),
        (conda.python if conda else None, "conda.yaml"),
    ):
        if version:
            parts = version.split(".")
            if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
                raise ModelFormatError(f"{where}: {version!r} is not a Python version")
            return version, where
    raise ModelFormatError(
        f"{model_dir}: no Python version in MLmodel, python_env.yaml or conda.yaml",
        hint="log the model with a current MLflow, which records python_version",
    )


def _top_level(files: tuple[FileEntry, ...], prefix: str) -> dict[str, list[FileEntry]]:
    groups: dict[str, list[FileEntry]] = {}
    for entry in subtree(files, prefix):
        rest = entry.path[len(prefix) + 1 :]
        groups.setdefault(rest.split("/", 1)[0], []).append(entry)
    return groups


def _code_entries(
    pyfunc: PyfuncFlavor, files: tuple[FileEntry, ...], model_dir: Path
) -> tuple[CodeEntry, ...]:
    if not pyfunc.code:
        return ()
    if not (model_dir / pyfunc.code).is_dir():
        raise ModelFormatError(
            f"MLmodel: flavors.{PYFUNC}.code names {pyfunc.code!r}, which "
            "is not a directory in the model"
        )
    return tuple(
        CodeEntry(
            path=f"{pyfunc.code}/{name}",
            kind="file"
            if len(group) == 1 and group[0].path == f"{pyfunc.code}/{name}"
            else "directory",
            size=sum(e.size for e in group),
            files=len(group),
        )
        for name, group in sorted(_top_level(files, pyfunc.code).items())
    )


def _artifacts(pyfunc_raw: dict[str, Any], files: tuple[FileEntry, ...]) -> tuple[Artifact, ...]:
    raw = pyfunc_raw.get("artifacts") or {}
    if not isinstance(raw, dict):
        raise ModelFormatError(f"MLmodel: flavors.{PYFUNC}.artifacts must be a mapping")
    artifacts = []
    for name, body in sorted(raw.items()):
        path = body.get("path") if isinstance(body, dict) else None
        if not path:
            raise ModelFormatError(f"MLmodel: flavors.{PYFUNC}.artifacts.{name} has no 'path'")
        entries = subtree(files, str(path))
        if not entries:
            raise ModelFormatError(
                f"MLmodel: artifact {name!r} should be at {path}, which is not in the model",
                hint="the model was not uploaded completely; log it again",
            )
        single = len(entries) == 1 and entries[0].path == str(path).strip("/")
        artifacts.append(
            Artifact(
                name=str(name),
                path=str(path),
                kind="file" if single else "directory",
                size=sum(e.size for e in entries),
                files=len(entries),
                sha256=entries[0].sha256
                if single
                else tree_digest(entries).removeprefix("sha256:"),
                logged_from=redact_uri(str(body["uri"])) if body.get("uri") else None,
            )
        )
    return tuple(artifacts)


def _input_example(info: object, present: set[str]) -> InputExample | None:
    if not isinstance(info, dict):
        return None
    path = _opt_str(info.get("artifact_path"))
    serving = _opt_str(info.get("serving_input_path"))
    return InputExample(
        path=path,
        type=_opt_str(info.get("type")),
        serving_input_path=serving,
        present=all(p in present for p in (path, serving) if p),
    )


def _opt_str(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def _opt_int(value: object) -> int | None:
    try:
        return int(value) if value is not None else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
