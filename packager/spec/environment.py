"""The environment files MLflow writes beside MLmodel, and the ``wheels/`` directory."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from packager.digest import FileEntry
from packager.errors import ModelFormatError
from packager.redact import redact_uris_in


class EnvFileKind(str, enum.Enum):
    REQUIREMENTS = "requirements"
    ORIGINAL_REQUIREMENTS = "original_requirements"  # kept by add_libraries_to_model
    CONSTRAINTS = "constraints"
    PYTHON_ENV = "python_env"
    CONDA = "conda"
    UV_LOCK = "uv_lock"
    PYPROJECT = "pyproject"


ENV_FILE_NAMES = {
    "requirements.txt": EnvFileKind.REQUIREMENTS,
    "original_requirements.txt": EnvFileKind.ORIGINAL_REQUIREMENTS,
    "constraints.txt": EnvFileKind.CONSTRAINTS,
    "python_env.yaml": EnvFileKind.PYTHON_ENV,
    "conda.yaml": EnvFileKind.CONDA,
    "uv.lock": EnvFileKind.UV_LOCK,
    "pyproject.toml": EnvFileKind.PYPROJECT,
}


@dataclass(frozen=True, kw_only=True)
class EnvFile:
    kind: EnvFileKind
    path: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class PythonEnv:
    """``python_env.yaml``."""

    python: str | None
    build_dependencies: tuple[str, ...]
    dependencies: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CondaEnv:
    """``conda.yaml``, split into conda packages and the pip list."""

    channels: tuple[str, ...]
    python: str | None
    conda_packages: tuple[str, ...]  # everything but python and pip
    pip: tuple[str, ...]

    @property
    def needs_conda(self) -> bool:
        """True when the pip path alone cannot build this environment."""
        return bool(self.conda_packages)


@dataclass(frozen=True, kw_only=True)
class Wheel:
    """A wheel shipped inside the model (``wheels/`` from add_libraries_to_model)."""

    path: str
    name: str
    version: str
    tags: tuple[str, ...]  # "py3-none-any", "cp311-cp311-manylinux_2_17_x86_64", …
    size: int
    sha256: str

    @property
    def pure(self) -> bool:
        return all(tag.endswith("-none-any") for tag in self.tags)


@dataclass(frozen=True, kw_only=True)
class WheelsDir:
    platform: str | None  # MLmodel `wheels.platform`: where they were built
    wheels: tuple[Wheel, ...]


def _yaml(model_dir: Path, name: str) -> Any:
    try:
        return yaml.safe_load((model_dir / name).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ModelFormatError(f"{name} is not valid YAML{where}: {err}") from err
    except OSError as err:
        raise ModelFormatError(f"cannot read {name}: {err.strerror}") from err


def _str_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ModelFormatError(f"{where} must be a list")
    # Entries may be pip options with credentialed index URLs: never keep those.
    return tuple(redact_uris_in(str(v)) for v in value if not isinstance(v, dict))


def read_python_env(model_dir: Path, name: str) -> PythonEnv:
    data = _yaml(model_dir, name)
    if not isinstance(data, dict):
        raise ModelFormatError(f"{name} must be a mapping with a 'python' field")
    python = data.get("python")
    return PythonEnv(
        python=str(python) if python is not None else None,
        build_dependencies=_str_list(data.get("build_dependencies"), f"{name}: build_dependencies"),
        dependencies=_str_list(data.get("dependencies"), f"{name}: dependencies"),
    )


def read_conda_env(model_dir: Path, name: str) -> CondaEnv:
    data = _yaml(model_dir, name)
    if not isinstance(data, dict):
        raise ModelFormatError(f"{name} must be a mapping with 'dependencies'")
    deps = data.get("dependencies") or []
    if not isinstance(deps, list):
        raise ModelFormatError(f"{name}: dependencies must be a list")
    python, conda_packages, pip = None, [], []
    for dep in deps:
        if isinstance(dep, dict):
            pip += list(_str_list(dep.get("pip"), f"{name}: dependencies.pip"))
            continue
        spec = redact_uris_in(str(dep).strip())
        bare = spec.split("::")[-1]
        package = bare.replace(" ", "").split("=")[0].split("<")[0].split(">")[0]
        if package == "python":
            python = bare[len("python") :].lstrip("=") or None
        elif package != "pip":
            conda_packages.append(spec)
    return CondaEnv(
        channels=_str_list(data.get("channels"), f"{name}: channels"),
        python=python,
        conda_packages=tuple(conda_packages),
        pip=tuple(pip),
    )


def read_wheels(files: tuple[FileEntry, ...], platform: str | None) -> WheelsDir | None:
    wheels = []
    for entry in files:
        if not entry.path.startswith("wheels/") or not entry.path.endswith(".whl"):
            continue
        filename = entry.path.rsplit("/", 1)[1]
        try:
            name, version, _, tags = parse_wheel_filename(filename)
        except InvalidWheelFilename as err:
            raise ModelFormatError(f"{entry.path}: not a valid wheel file name ({err})") from err
        wheels.append(
            Wheel(
                path=entry.path,
                name=str(name),
                version=str(version),
                tags=tuple(sorted(str(t) for t in tags)),
                size=entry.size,
                sha256=entry.sha256,
            )
        )
    if not wheels and platform is None:
        return None
    return WheelsDir(platform=platform, wheels=tuple(wheels))
