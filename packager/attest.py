"""Supply-chain attestations of a released image: a CycloneDX SBOM and an in-toto
Statement with an SLSA Provenance v1 predicate.

Both are plain data computed from what the build already knows (the wheelhouse that was
installed into ``/opt/venv``, the base's dpkg status, the model's provenance, the lock and
base digests); nothing here reads the clock or draws random numbers, so the same release
gives byte-identical attestations (the SBOM's serial number is derived from the image
digest, its timestamp is the image's epoch). Pushing them is :mod:`packager.publish`'s.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from packager import __version__
from packager.env.condalock import CondaPackage
from packager.env.wheelhouse import WheelFile
from packager.source import Provenance
from packager.stage import LOCK_DIGEST_LABEL
from packager_server import __version__ as server_version

SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
PROVENANCE_MEDIA_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:packager:release:v1"
BUILDER_ID = "urn:packager:builder"
# The lock as packager writes it (pip's --require-hashes format plus packager's header).
LOCK_MEDIA_TYPE = "text/x-packager-lock; charset=utf-8"
# A fixed namespace for the SBOM's serial number (uuid5 of the image digest).
_SERIAL_NAMESPACE = uuid.UUID("6f1c3f0e-4a8e-5b7c-9d2a-0c1b2a3d4e5f")


@dataclass(frozen=True, kw_only=True)
class DebianPackage:
    name: str
    version: str
    architecture: str


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """The options besides the model, lock and base that decide an image's bytes: what a
    rebuild must pass again (``packager rebuild`` reads them from the provenance)."""

    bytecode: bool = True
    keep_tests: bool = False
    mlflow_skinny: bool = False
    ignore_conda: bool = False
    backend: str = "oci"  # "docker": the engine's images are not byte-reproducible

    def as_json(self) -> dict[str, bool | str]:
        return {
            "bytecode": self.bytecode,
            "keepTests": self.keep_tests,
            "mlflowSkinny": self.mlflow_skinny,
            "ignoreConda": self.ignore_conda,
            "backend": self.backend,
        }


@dataclass(frozen=True, kw_only=True)
class ImageFacts:
    """What both attestations describe."""

    repository: str  # REGISTRY/REPO
    digest: str  # the image manifest's sha256:…
    epoch: int  # the image's timestamp (from the model version)
    provenance: Provenance
    model_uri: str  # models:/NAME/VERSION
    lock_digest: str
    base_reference: str
    base_digest: str
    wheels: tuple[WheelFile, ...]
    debian: tuple[DebianPackage, ...]
    conda: tuple[CondaPackage, ...] = ()  # /opt/conda's packages, from the lock
    # The lock itself travels in the provenance (its digest alone would not let anyone
    # rebuild: a new resolution may pick newer releases), and the build options with it.
    lock_text: str = ""
    options: BuildOptions = field(default_factory=BuildOptions)


def dpkg_packages(status: str) -> tuple[DebianPackage, ...]:
    """The installed packages of a dpkg ``status`` file (``Status: install ok installed``),
    sorted by name and architecture."""
    found = []
    for paragraph in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found.append(
                DebianPackage(
                    name=fields["Package"],
                    version=fields.get("Version", ""),
                    architecture=fields.get("Architecture", ""),
                )
            )
    return tuple(sorted(found, key=lambda p: (p.name, p.architecture)))


def sbom(facts: ImageFacts) -> bytes:
    """The image's CycloneDX 1.6 JSON SBOM."""
    image = Component(
        type=ComponentType.CONTAINER,
        name=facts.repository,
        version=facts.digest,
        bom_ref=f"image:{facts.digest}",
        hashes=[_sha256(facts.digest)],
    )
    components = [
        _model(facts),
        Component(
            type=ComponentType.APPLICATION,
            name="packager_server",
            version=server_version,
            bom_ref="packager_server",
            description="the scoring server packager ships into the image",
        ),
        *(_wheel(w) for w in facts.wheels),
        *(_debian(p) for p in facts.debian),
        *(_conda(p) for p in facts.conda),
    ]
    bom = Bom(
        serial_number=uuid.uuid5(_SERIAL_NAMESPACE, facts.digest),
        metadata=BomMetaData(
            component=image,
            timestamp=dt.datetime.fromtimestamp(facts.epoch, tz=dt.timezone.utc),
        ),
        components=components,
    )
    bom.register_dependency(image, components)  # the image holds them all
    return _compact(JsonV1Dot6(bom).output_as_string())


def provenance_statement(facts: ImageFacts) -> bytes:
    """An in-toto Statement v1 whose predicate is SLSA Provenance v1."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": facts.repository, "digest": _digest_set(facts.digest)}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "model": facts.model_uri,
                    "modelName": facts.provenance.model_name,
                    "modelVersion": facts.provenance.model_version,
                    "baseImage": facts.base_reference,
                    "options": facts.options.as_json(),
                },
                "resolvedDependencies": [
                    {
                        "uri": facts.model_uri,
                        "name": "model",
                        "digest": _digest_set(facts.provenance.content_digest),
                    },
                    {
                        "name": "lock",
                        "digest": _digest_set(facts.lock_digest),
                        "mediaType": LOCK_MEDIA_TYPE,
                        "content": base64.b64encode(facts.lock_text.encode()).decode(),
                    }
                    if facts.lock_text
                    else {"name": "lock", "digest": _digest_set(facts.lock_digest)},
                    {
                        "uri": facts.base_reference,
                        "name": "base",
                        "digest": _digest_set(facts.base_digest),
                    },
                ],
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"packager": __version__}},
                "metadata": {},
            },
        },
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def _model(facts: ImageFacts) -> Component:
    prov = facts.provenance
    properties = [Property(name="mlflow:uri", value=facts.model_uri)]
    if prov.run_id:
        properties.append(Property(name="mlflow:run_id", value=prov.run_id))
    if prov.source:
        properties.append(Property(name="mlflow:source", value=prov.source))
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=prov.model_name or facts.model_uri,
        version=prov.model_version,
        bom_ref="model",
        hashes=[_sha256(prov.content_digest)] if prov.content_digest else None,
        properties=properties,
    )


def _wheel(wheel: WheelFile) -> Component:
    purl = PackageURL(type="pypi", name=wheel.name, version=wheel.version)
    return Component(
        type=ComponentType.LIBRARY,
        name=wheel.name,
        version=wheel.version,
        bom_ref=f"pypi:{wheel.name}",
        purl=purl,
        hashes=[_sha256(wheel.sha256)],
        properties=[Property(name="packager:wheel", value=wheel.filename)],
    )


def _debian(package: DebianPackage) -> Component:
    qualifiers = {"arch": package.architecture} if package.architecture else None
    purl = PackageURL(
        type="deb",
        namespace="debian",
        name=package.name,
        version=package.version,
        qualifiers=qualifiers,
    )
    return Component(
        type=ComponentType.LIBRARY,
        name=package.name,
        version=package.version,
        bom_ref=f"deb:{package.name}:{package.architecture}",
        purl=purl,
    )


def _conda(package: CondaPackage) -> Component:
    """purl's conda type: the build, the channel (the lock's URL, without credentials),
    the subdir and the archive type as qualifiers."""
    file_name = package.file_name
    kind = "conda" if file_name.endswith(".conda") else "tar.bz2"
    purl = PackageURL(
        type="conda",
        name=package.name,
        version=package.version,
        qualifiers={
            "build": package.build,
            "channel": package.url.rsplit("/", 2)[0],
            "subdir": package.subdir,
            "type": kind,
        },
    )
    return Component(
        type=ComponentType.LIBRARY,
        name=package.name,
        version=package.version,
        bom_ref=f"conda:{package.name}",
        purl=purl,
        hashes=[_sha256(package.sha256), HashType(alg=HashAlgorithm.MD5, content=package.md5)],
        properties=[Property(name="packager:conda-package", value=file_name)],
    )


def _sha256(digest: str) -> HashType:
    return HashType(alg=HashAlgorithm.SHA_256, content=digest.removeprefix("sha256:"))


def _digest_set(digest: str) -> dict[str, str]:
    algorithm, _, value = digest.partition(":")
    return {algorithm: value} if value else {}


def _compact(text: str) -> bytes:
    """Canonical JSON: the library's output re-serialised with sorted keys, no spaces."""
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")).encode()


def installed_names(document: bytes) -> Iterable[tuple[str, str]]:
    """The (name, version) of every ``pkg:pypi`` component an SBOM lists."""
    for component in json.loads(document).get("components", []):
        if str(component.get("purl", "")).startswith("pkg:pypi/"):
            yield str(component["name"]), str(component["version"])


def check(
    digest: str, labels: dict[str, str], sbom_document: bytes, statement_document: bytes
) -> tuple[str, ...]:
    """What in an image's attestations disagrees with the image (its manifest digest and
    the labels packager wrote into its config); empty when they agree."""
    problems: list[str] = []
    try:
        bom = json.loads(sbom_document)
        statement = json.loads(statement_document)
    except ValueError as err:
        return (f"an attestation is not JSON: {err}",)
    described = (bom.get("metadata") or {}).get("component") or {}
    if described.get("version") != digest:
        problems.append(f"the SBOM describes {described.get('version')}, not {digest}")
    subjects = [s.get("digest", {}) for s in statement.get("subject", [])]
    if _digest_set(digest) not in subjects:
        problems.append(f"the provenance's subject is {subjects}, not {digest}")
    model = next(
        (c for c in bom.get("components", []) if c.get("type") == "machine-learning-model"),
        None,
    )
    if model is None:
        problems.append("the SBOM lists no model")
    else:
        hashes = [f"sha256:{h.get('content')}" for h in model.get("hashes", [])]
        for label, found in (
            ("io.packager.model.name", [model.get("name")]),
            ("io.packager.model.version", [model.get("version")]),
            ("io.packager.model.digest", hashes),
        ):
            if label in labels and labels[label] not in found:
                problems.append(
                    f"the SBOM's model has {found}, the label {label} says {labels[label]}"
                )
    resolved = {
        d.get("name"): d.get("digest", {})
        for d in statement.get("predicate", {})
        .get("buildDefinition", {})
        .get("resolvedDependencies", [])
    }
    lock = labels.get(LOCK_DIGEST_LABEL)
    if lock is not None and resolved.get("lock") != _digest_set(lock):
        problems.append(f"the provenance's lock is {resolved.get('lock')}, the label says {lock}")
    return tuple(problems)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a provenance statement says the image was built from."""

    subject: str  # sha256:… of the image
    model_uri: str
    model_digest: str
    base_reference: str
    base_digest: str
    lock_digest: str
    lock_text: str
    options: BuildOptions
    packager_version: str  # the packager that built the image


class ProvenanceError(ValueError):
    """A provenance statement that does not say how to rebuild its image."""


def recipe_from(statement_document: bytes) -> Recipe:
    """Read back what :func:`provenance_statement` wrote; the lock's content is checked
    against its digest."""
    try:
        statement = json.loads(statement_document)
    except ValueError as err:
        raise ProvenanceError(f"the provenance is not JSON: {err}") from err
    try:
        return _recipe(statement)
    except (AttributeError, TypeError, KeyError, ValueError) as err:
        if isinstance(err, ProvenanceError):
            raise
        raise ProvenanceError(
            f"the provenance is not shaped as packager writes it ({err})"
        ) from err


def _recipe(statement: Any) -> Recipe:
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != (
        SLSA_PROVENANCE
    ):
        raise ProvenanceError("the provenance is not an in-toto Statement of SLSA Provenance v1")
    definition: dict[str, Any] = statement.get("predicate", {}).get("buildDefinition", {})
    if definition.get("buildType") != BUILD_TYPE:
        raise ProvenanceError(
            f"the provenance's build type is {definition.get('buildType')!r}, not packager's"
        )
    params: dict[str, Any] = definition.get("externalParameters", {})
    resolved = {d.get("name"): d for d in definition.get("resolvedDependencies", [])}
    missing = [n for n in ("model", "lock", "base") if n not in resolved]
    if missing or "model" not in params or "baseImage" not in params:
        raise ProvenanceError(f"the provenance names no {', '.join(missing) or 'parameters'}")
    lock = resolved["lock"]
    if "content" not in lock:
        raise ProvenanceError(
            "the provenance records the lock's digest but not the lock itself (an earlier "
            "packager released this image), so the build cannot be repeated from it"
        )
    lock_text = base64.b64decode(lock["content"]).decode()
    lock_digest = "sha256:" + lock.get("digest", {}).get("sha256", "")
    if "sha256:" + hashlib.sha256(lock_text.encode()).hexdigest() != lock_digest:
        raise ProvenanceError("the lock in the provenance does not match its digest")
    options = params.get("options", {})
    subjects = statement.get("subject") or [{}]
    return Recipe(
        subject="sha256:" + subjects[0].get("digest", {}).get("sha256", ""),
        model_uri=str(params["model"]),
        model_digest="sha256:" + resolved["model"].get("digest", {}).get("sha256", ""),
        base_reference=str(params["baseImage"]),
        base_digest="sha256:" + resolved["base"].get("digest", {}).get("sha256", ""),
        lock_digest=lock_digest,
        lock_text=lock_text,
        options=BuildOptions(
            bytecode=bool(options.get("bytecode", True)),
            keep_tests=bool(options.get("keepTests", False)),
            mlflow_skinny=bool(options.get("mlflowSkinny", False)),
            ignore_conda=bool(options.get("ignoreConda", False)),
            backend=str(options.get("backend", "oci")),
        ),
        packager_version=str(
            statement["predicate"]["runDetails"]["builder"]["version"]["packager"]
        ),
    )
