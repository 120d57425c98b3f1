"""Stage 4, ``stage``: the files to ship and the Dockerfile, as data, then on disk.

:func:`plan_context` computes everything (pure: no Docker, no network);
:func:`write_context` writes a self-contained build context that any builder can build
with no network (docker, buildx, kaniko, buildah)::

    Dockerfile              rendered from templates/Dockerfile.j2
    requirements.lock       the lock (pip --require-hashes format)
    wheelhouse.txt          every wheel's sha256, name, version (wheelinstall's manifest)
    wheels/                 the wheelhouse: every locked wheel, nothing else
    tools/                  wheelinstall.py and pypa's installer, to install the wheels
    conda/opt-conda.tar     the model's conda packages as installed at /opt/conda (only
                            with a conda part: packager.image.condalayer's layer, ADDed)
    server/packager_server  the scoring server
    model-code/             the model's code/ (its own layer)
    model-artifacts/        PythonModel artifacts (their own layer)
    model/                  MLmodel, env files, weights, examples

Layers go from what changes least to what changes most, so a new version of a model with
the same lock reuses every layer up to its own files. Environment files are shipped with
every URL's credentials removed (a model's requirements.txt may name a private index with
its token).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import yaml

import packager_server
from packager import __version__
from packager.env.lock import Lock
from packager.env.wheelhouse import Wheelhouse
from packager.errors import ModelFormatError
from packager.redact import redact_uris_in
from packager.reference import RefKind
from packager.render import render, value_problem
from packager.source import MAX_NAME_LENGTH, Provenance
from packager.spec import ModelSpec
from packager.spec.environment import ENV_FILE_NAMES

if TYPE_CHECKING:
    from packager.image.condalayer import CondaPart

log = logging.getLogger(__name__)

MODEL_DIR = "/opt/model"
VENV = "/opt/venv"
SERVER_DIR = "/opt/packager/server"
PORT = 8080
REGISTERED_MODEL_META = "registered_model_meta"
# Images built from the same lock share their dependency layers (see api._load).
LOCK_DIGEST_LABEL = "io.packager.lock.digest"
USER_ID = 10001
# One label value's limit: every label shares one Dockerfile line, which Docker caps at 64 KiB.
MAX_LABEL_LENGTH = 2048
# One definition for both backends (the Dockerfile and the OCI config).
ENTRYPOINT = ("python", "-m", "packager_server")
# The port as the server picks it (PORT, AIP_HTTP_PORT, ... before PACKAGER_PORT).
HEALTHCHECK = ("python", "-m", "packager_server.health")
# Where a build context carries the conda layer (packager.image.condalayer), ADDed at /.
CONDA_CONTEXT_FILE = "conda/opt-conda.tar"


@dataclass(frozen=True, kw_only=True)
class ContextFile:
    destination: str  # relative to the build context
    source: Path | None = None
    content: bytes | None = None
    # Readable only by root in the image (the source kept it from "others"): see
    # _private_files. Else the mode is normal_mode() of the source's.
    private: bool = False
    # A model directory whose own image layer holds this file (OCI backend): see
    # spec.model.Flavor.layer_dirs. The Docker backend copies it with the rest of model/.
    layer: str | None = None


@dataclass(frozen=True, kw_only=True)
class BuildPlan:
    """Everything needed to write the build context; comparable and testable."""

    base_image: str
    python: str
    files: tuple[ContextFile, ...]
    labels: tuple[tuple[str, str], ...]
    environment: tuple[tuple[str, str], ...]
    system_packages: tuple[str, ...]
    dockerfile: str
    bytecode: bool = True  # /opt/venv ships pycs written by the base's interpreter
    keep_tests: bool = False  # else the packages' tests directories are removed
    conda: CondaPart | None = None  # the conda packages' layer at /opt/conda

    @property
    def venv_python(self) -> str | None:
        """The venv's interpreter when it is not the base's (a conda environment's)."""
        return None if self.conda is None else self.conda.interpreter


def plan_context(
    spec: ModelSpec,
    provenance: Provenance,
    lock: Lock,
    wheelhouse: Wheelhouse,
    *,
    base_image: str,
    base_digest: str | None = None,
    system_packages: tuple[str, ...] = (),
    dockerfile: bool = True,
    bytecode: bool = True,
    keep_tests: bool = False,
    conda: CondaPart | None = None,
) -> BuildPlan:
    """The context for ``spec``; ``base_digest`` pins the base in the image's labels.

    ``dockerfile=False`` skips rendering the Dockerfile (the OCI backend has no use for it).
    ``conda``: the lock's conda packages, installed for /opt/conda (both backends ship
    its layer as it is).
    """
    if conda is not None and conda.python not in (None, lock.target.python):
        raise ModelFormatError(
            f"the conda environment provides Python {conda.python}, but the lock's pip part "
            f"is for Python {lock.target.python}",
            hint="lock again without --python: the conda environment's Python decides it",
        )
    files: list[ContextFile] = [
        ContextFile(destination="requirements.lock", content=lock.render().encode()),
        ContextFile(destination="wheelhouse.txt", content=wheelhouse_manifest(wheelhouse)),
        *(ContextFile(destination=f"wheels/{w.filename}", source=w.path) for w in wheelhouse.files),
        *_tool_files(),
        *_server_files(),
    ]
    if conda is not None:
        files.append(ContextFile(destination=CONDA_CONTEXT_FILE, source=conda.layer.path))
    code_prefix = f"{spec.pyfunc.code}/" if spec.pyfunc.code else None
    artifact_prefixes = tuple(f"{a.path.rstrip('/')}" for a in spec.artifacts)
    scrubbed = spec.requirement_files | ENV_FILE_NAMES.keys()
    kept_private = _private_files(spec)
    layer_dirs = [d for flavor in spec.flavors for d in flavor.layer_dirs]
    # spec.files is the source stage's one walk of the model (links resolved, nothing from
    # outside it): the same list the content digest covers is the list that ships.
    for entry in spec.files:
        relative = entry.path
        if "__pycache__" in relative.split("/") or relative == REGISTERED_MODEL_META:
            continue  # REGISTERED_MODEL_META is written below, from the provenance
        # The file itself, not a link to it (walk_files checked that it is in the model):
        # a link would reach the build context, and COPY, as a link.
        path = Path(os.path.realpath(spec.path / relative))
        private = relative in kept_private
        layer = None
        if code_prefix and relative.startswith(code_prefix):
            destination = f"model-code/{relative}"
        elif any(relative == p or relative.startswith(p + "/") for p in artifact_prefixes):
            destination = f"model-artifacts/{relative}"
        else:
            destination = f"model/{relative}"
            layer = next((d for d in layer_dirs if relative.startswith(f"{d}/")), None)
        if relative in scrubbed:
            text = path.read_bytes().decode("utf-8", errors="replace")
            content = redact_uris_in(text).encode()
            files.append(
                ContextFile(destination=destination, content=content, private=private, layer=layer)
            )
        else:
            files.append(
                ContextFile(destination=destination, source=path, private=private, layer=layer)
            )
    # The server names the model in /version and metrics from this file (MLflow writes
    # it when it downloads a models:/ URI). A file, not ENV, so that everything which
    # changes with the version sits in the model's own layer: the steps before it stay
    # cached for the next version.
    files.append(
        ContextFile(
            destination=f"model/{REGISTERED_MODEL_META}",
            content=yaml.safe_dump(
                {
                    "model_name": provenance.model_name or spec.path.name,
                    "model_version": provenance.model_version or "",
                },
                sort_keys=True,
            ).encode(),
        )
    )
    if base_digest is None and "@sha256:" in base_image:
        base_digest = base_image.rsplit("@", 1)[1]
    labels = (*_labels(spec, provenance, lock), *_base_labels(base_image, base_digest))
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    # A conda prefix comes after the venv, as in an activated environment with a venv
    # on top; its libraries are found by the dynamic loader (tools, ctypes loads).
    conda_env = (
        (
            ("PATH", f"{VENV}/bin:{conda.prefix}/bin:{system_path}"),
            ("LD_LIBRARY_PATH", f"{conda.prefix}/lib"),
        )
        if conda is not None
        else (("PATH", f"{VENV}/bin:{system_path}"),)
    )
    environment = (
        *conda_env,
        ("PYTHONPATH", SERVER_DIR),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PACKAGER_MODEL_DIR", MODEL_DIR),
        ("PACKAGER_PORT", str(PORT)),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("DO_NOT_TRACK", "true"),
    )
    plan = BuildPlan(
        base_image=base_image,
        python=lock.target.python,
        files=tuple(files),
        labels=labels,
        environment=environment,
        system_packages=system_packages,
        dockerfile="",
        bytecode=bytecode,
        keep_tests=keep_tests,
        conda=conda,
    )
    return replace(plan, dockerfile=render_dockerfile(plan)) if dockerfile else plan


def render_dockerfile(plan: BuildPlan) -> str:
    """The Dockerfile; everything that is the same for every version of a model comes
    before the model's files, so a new version re-runs only its COPY and LABEL steps."""
    return render(
        "Dockerfile.j2",
        plan=plan,
        packager_version=__version__,
        venv=VENV,
        model_dir=MODEL_DIR,
        server_dir=SERVER_DIR,
        port=PORT,
        user_id=USER_ID,
        entrypoint=json.dumps(list(ENTRYPOINT)),
        healthcheck=json.dumps(list(HEALTHCHECK)),
        conda_file=CONDA_CONTEXT_FILE,
    )


def wheelhouse_manifest(wheelhouse: Wheelhouse) -> bytes:
    """The manifest :mod:`packager.image.wheelinstall` checks the wheels against."""
    lines = [
        f"{w.sha256} {w.name} {w.version} {w.filename}" + (" built" if w.built_here else "")
        for w in sorted(wheelhouse.files, key=lambda w: w.filename)
    ]
    return ("\n".join(["# sha256 name version filename [built]", *lines]) + "\n").encode()


def write_context(plan: BuildPlan, directory: Path) -> None:
    """Write the build context (replacing ``directory``'s contents).

    Modes are normalized (0644, or 0755 when any execute bit is set) because COPY keeps
    them: with a umask of 077 the image's files would otherwise be unreadable by its
    non-root user.
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / "Dockerfile").write_text(plan.dockerfile)
    for item in plan.files:
        target = directory / item.destination
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o644
        if item.content is not None:
            target.write_bytes(item.content)
        elif item.source is not None:
            mode = item.source.stat().st_mode  # the source's: copyfile keeps no mode
            if not item.private and mode & 0o777 == normal_mode(mode):
                try:  # wheels are large and immutable in the cache: link, don't copy
                    os.link(item.source, target)
                    continue
                except OSError:
                    pass
            shutil.copyfile(item.source, target)
        target.chmod(normal_mode(mode, private=item.private))
    for folder in ("model-code", "model-artifacts"):
        (directory / folder).mkdir(exist_ok=True)  # COPY needs the folder, even empty
    (directory / "Dockerfile").chmod(0o644)
    for folder, _, _ in os.walk(directory):
        Path(folder).chmod(0o755)


def normal_mode(mode: int, *, private: bool = False) -> int:
    """0755 for anything executable by someone, 0644 otherwise (what image layers get);
    0700 and 0600 for a private file."""
    if private:
        return 0o700 if mode & 0o111 else 0o600
    return 0o755 if mode & 0o111 else 0o644


def _private_files(spec: ModelSpec) -> frozenset[str]:
    """Files the source deliberately keeps from "others": not readable by them while the
    model's MLmodel is. The image keeps them unreadable to its server user (who is "other"
    to every root-owned file), so a build never widens who may read a secret-like file.
    When MLmodel itself is not readable by others, the whole tree follows one restrictive
    umask (077), which says nothing about single files: every file is shipped readable."""
    mlmodel = next((e for e in spec.files if e.path == "MLmodel"), None)
    if mlmodel is None or not mlmodel.public:
        return frozenset()
    private = frozenset(e.path for e in spec.files if not e.public)
    for path in sorted(private):
        log.warning(
            "%s is not readable by others in the model directory: the image keeps it "
            "readable only by root, so the server (uid %d) cannot read it. Its bytes are "
            "still in the image; remove it from the model if it is a secret, or make it "
            "readable (chmod o+r) if the model needs it",
            path,
            USER_ID,
        )
    return private


def _tool_files() -> list[ContextFile]:
    """wheelinstall.py and the pure-Python ``installer`` package it imports."""
    import installer  # noqa: PLC0415 - a dependency, needed only here

    from packager.image import wheelinstall  # noqa: PLC0415

    package = Path(installer.__file__).parent
    files = [ContextFile(destination="tools/wheelinstall.py", source=Path(wheelinstall.__file__))]
    files += [
        ContextFile(destination=f"tools/installer/{p.relative_to(package).as_posix()}", source=p)
        for p in sorted(package.rglob("*.py"))
        if "__pycache__" not in p.parts
    ]
    return files


def _server_files() -> list[ContextFile]:
    package = Path(packager_server.__file__).parent
    return [
        ContextFile(destination=f"server/packager_server/{p.name}", source=p)
        for p in sorted(package.glob("*.py"))
    ]


def _labels(spec: ModelSpec, provenance: Provenance, lock: Lock) -> tuple[tuple[str, str], ...]:
    """The image's labels: location-free, so the same model, lock and base give the same
    labels (and OCI digest) on every machine and in every directory. A local model is
    identified by its content digest; the directory it was read from, and a local-file
    registry's path, are in ``--json`` only."""
    name = provenance.model_name or spec.path.name
    problem = value_problem(name, MAX_NAME_LENGTH)
    if problem:
        raise ModelFormatError(
            f"the model name {name[:60]!r}… {problem}",
            hint="register the model under a name of one line of at most "
            f"{MAX_NAME_LENGTH} characters (or rename the model directory)",
        )
    local = provenance.reached_through is RefKind.LOCAL
    source = "" if local else provenance.source or ""
    registry = _location_free(provenance.registry_uri or provenance.tracking_uri or "")
    pairs = [
        ("org.opencontainers.image.title", f"{name} (MLflow model)"),
        ("org.opencontainers.image.version", provenance.model_version or ""),
        ("org.opencontainers.image.revision", provenance.run_id or ""),
        ("org.opencontainers.image.source", source),
        (
            "org.opencontainers.image.description",
            f"MLflow model {name} served by packager_server {packager_server.__version__}",
        ),
        ("io.packager.model.name", name),
        ("io.packager.model.version", provenance.model_version or ""),
        ("io.packager.model.run-id", provenance.run_id or ""),
        ("io.packager.model.source", source),
        ("io.packager.model.digest", provenance.content_digest),
        ("io.packager.registry", registry),
        (LOCK_DIGEST_LABEL, lock.digest),
        ("io.packager.version", __version__),
    ]
    return tuple((k, _label_value(k, v)) for k, v in pairs if v)


def _base_labels(base_image: str, base_digest: str | None) -> list[tuple[str, str]]:
    """The base's name (unless it is a file on the build host: its digest says it all)."""
    labels = []
    if not base_image.startswith(("oci:", "docker-archive:")):
        labels.append(("org.opencontainers.image.base.name", _label_value("base", base_image)))
    if base_digest:
        labels.append(("org.opencontainers.image.base.digest", base_digest))
    return labels


def _location_free(uri: str) -> str:
    """``uri`` unless it names a file on the build host (``sqlite:///…``, ``file:…``, a path)."""
    if uri.startswith(("/", ".", "~")):
        return ""
    return "" if urlsplit(uri).scheme in ("sqlite", "file") else uri


def _label_value(key: str, value: str) -> str:
    """Every label reaches the Dockerfile on one line (64 KiB at most) and OCI configs
    verbatim: check it before anything is built."""
    problem = value_problem(value, MAX_LABEL_LENGTH)
    if problem:
        raise ModelFormatError(
            f"the image label {key} would be {value[:60]!r}…, which {problem}",
            hint="the value comes from the model's registry entry or MLmodel: fix it there",
        )
    return value
