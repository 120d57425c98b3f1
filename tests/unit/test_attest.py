"""The SBOM (validated against CycloneDX's own schema, as the library ships it) and the
in-toto/SLSA provenance statement, from made-up but well-formed inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from packager import __version__, attest
from packager.env.wheelhouse import WheelFile
from packager.source import Provenance

STATUS = """\
Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u9
Description: GNU C Library
 multi-line description

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u10
"""

DIGEST = "sha256:" + "d" * 64


def facts() -> attest.ImageFacts:
    return attest.ImageFacts(
        repository="127.0.0.1:5000/wine",
        digest=DIGEST,
        epoch=1_700_000_000,
        provenance=Provenance(
            reference="models:/wine/3",
            reached_through="version",  # type: ignore[arg-type]
            model_name="wine",
            model_version="3",
            run_id="0123abcd",
            content_digest="sha256:" + "c" * 64,
        ),
        model_uri="models:/wine/3",
        lock_digest="sha256:" + "1" * 64,
        base_reference="packager-test-base:3.11",
        base_digest="sha256:" + "2" * 64,
        wheels=(
            WheelFile(
                name="numpy",
                version="2.1.3",
                filename="numpy-2.1.3-cp311-cp311-manylinux_2_17_x86_64.whl",
                sha256="a" * 64,
                path=Path("/nonexistent"),
            ),
            WheelFile(
                name="scikit-learn",
                version="1.5.2",
                filename="scikit_learn-1.5.2-cp311-cp311-manylinux_2_17_x86_64.whl",
                sha256="b" * 64,
                path=Path("/nonexistent"),
            ),
        ),
        debian=attest.dpkg_packages(STATUS),
    )


def test_dpkg_status_lists_only_installed_packages() -> None:
    assert attest.dpkg_packages(STATUS) == (
        attest.DebianPackage(name="base-files", version="12.4+deb12u10", architecture="amd64"),
        attest.DebianPackage(name="libc6", version="2.36-9+deb12u9", architecture="amd64"),
    )


def test_sbom_is_valid_cyclonedx_and_lists_everything() -> None:
    document = attest.sbom(facts())
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(document.decode())
    assert error is None, error
    bom = json.loads(document)
    by_ref = {c["bom-ref"]: c for c in bom["components"]}
    assert by_ref["pypi:numpy"]["purl"] == "pkg:pypi/numpy@2.1.3"
    assert by_ref["pypi:numpy"]["hashes"] == [{"alg": "SHA-256", "content": "a" * 64}]
    assert by_ref["pypi:scikit-learn"]["purl"] == "pkg:pypi/scikit-learn@1.5.2"
    assert by_ref["deb:libc6:amd64"]["purl"] == "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64"
    assert "deb:removed-one:amd64" not in by_ref
    model = by_ref["model"]
    assert model["type"] == "machine-learning-model"
    assert model["hashes"] == [{"alg": "SHA-256", "content": "c" * 64}]
    assert {"name": "mlflow:run_id", "value": "0123abcd"} in model["properties"]
    assert {"name": "mlflow:uri", "value": "models:/wine/3"} in model["properties"]
    assert by_ref["packager_server"]["version"] == __version__
    assert bom["metadata"]["component"]["version"] == DIGEST
    assert sorted(attest.installed_names(document)) == [
        ("numpy", "2.1.3"),
        ("scikit-learn", "1.5.2"),
    ]


def test_the_sbom_lists_the_conda_packages_with_their_channel_and_hashes() -> None:
    from dataclasses import replace

    from tests.unit.test_conda import CONDA

    document = attest.sbom(replace(facts(), conda=CONDA.packages))
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(document.decode())
    assert error is None, error
    by_ref = {c["bom-ref"]: c for c in json.loads(document)["components"]}
    tool = by_ref["conda:acme-tool"]
    package = CONDA.get("acme-tool")
    assert package is not None
    channel = package.url.rsplit("/", 2)[0]
    assert tool["purl"] == (
        f"pkg:conda/acme-tool@2.0?build={package.build}"
        f"&channel={channel}&subdir=linux-64&type=conda"
    )
    assert {(h["alg"], h["content"]) for h in tool["hashes"]} == {
        ("SHA-256", package.sha256),
        ("MD5", package.md5),
    }
    assert {c for c in by_ref if c.startswith("conda:")} == {
        "conda:acme-tool",
        "conda:libacme",
        "conda:python",
    }
    # installed_names reads the venv's packages (what rebuild compares): conda's stay out.
    assert sorted(attest.installed_names(document)) == [
        ("numpy", "2.1.3"),
        ("scikit-learn", "1.5.2"),
    ]


def test_attestations_are_the_same_bytes_for_the_same_image() -> None:
    assert attest.sbom(facts()) == attest.sbom(facts())
    assert attest.provenance_statement(facts()) == attest.provenance_statement(facts())
    other = replace(facts(), digest="sha256:" + "e" * 64)
    assert (
        json.loads(attest.sbom(other))["serialNumber"]
        != json.loads(attest.sbom(facts()))["serialNumber"]
    )


def test_provenance_is_an_in_toto_statement_with_slsa_v1() -> None:
    statement = json.loads(attest.provenance_statement(facts()))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": "127.0.0.1:5000/wine", "digest": {"sha256": "d" * 64}}]
    build = statement["predicate"]["buildDefinition"]
    assert build["externalParameters"]["model"] == "models:/wine/3"
    resolved = {d["name"]: d["digest"]["sha256"] for d in build["resolvedDependencies"]}
    assert resolved == {"model": "c" * 64, "lock": "1" * 64, "base": "2" * 64}
    builder = statement["predicate"]["runDetails"]["builder"]
    assert builder["version"] == {"packager": __version__}


def test_check_accepts_its_own_attestations_and_names_each_mismatch() -> None:
    labels = {
        "io.packager.model.name": "wine",
        "io.packager.model.version": "3",
        "io.packager.model.digest": "sha256:" + "c" * 64,
        "io.packager.lock.digest": "sha256:" + "1" * 64,
    }
    sbom, statement = attest.sbom(facts()), attest.provenance_statement(facts())
    assert attest.check(DIGEST, labels, sbom, statement) == ()
    other = "sha256:" + "f" * 64
    problems = attest.check(other, labels | {"io.packager.model.version": "4"}, sbom, statement)
    assert problems == (
        f"the SBOM describes {DIGEST}, not {other}",
        f"the provenance's subject is [{{'sha256': '{'d' * 64}'}}], not {other}",
        "the SBOM's model has ['3'], the label io.packager.model.version says 4",
    )
    wrong_lock = labels | {"io.packager.lock.digest": "sha256:" + "9" * 64}
    assert len(attest.check(DIGEST, wrong_lock, sbom, statement)) == 1


LOCK_TEXT = (
    "# packager lock v1\n# target: python 3.11 (3.11.9) linux/arm64\n"
    "numpy==2.1.3 \\\n    --hash=sha256:" + "9" * 64 + "\n"
)


def with_lock() -> attest.ImageFacts:
    import hashlib

    digest = "sha256:" + hashlib.sha256(LOCK_TEXT.encode()).hexdigest()
    return replace(
        facts(),
        lock_digest=digest,
        lock_text=LOCK_TEXT,
        options=attest.BuildOptions(bytecode=False, keep_tests=True, mlflow_skinny=True),
    )


def test_the_provenance_carries_what_a_rebuild_needs() -> None:
    recipe = attest.recipe_from(attest.provenance_statement(with_lock()))
    assert recipe.subject == DIGEST
    assert recipe.model_uri == "models:/wine/3"
    assert recipe.model_digest == "sha256:" + "c" * 64
    assert (recipe.base_reference, recipe.base_digest) == (
        "packager-test-base:3.11",
        "sha256:" + "2" * 64,
    )
    assert recipe.lock_text == LOCK_TEXT
    assert recipe.lock_digest == with_lock().lock_digest
    assert recipe.packager_version == __version__
    assert recipe.options == attest.BuildOptions(
        bytecode=False, keep_tests=True, mlflow_skinny=True
    )


def test_a_provenance_that_cannot_be_followed_says_why() -> None:
    import pytest

    # Without the lock's text (only its digest): no rebuild from a new resolution.
    with pytest.raises(attest.ProvenanceError, match="not the lock itself"):
        attest.recipe_from(attest.provenance_statement(facts()))
    # A lock whose text was altered no longer matches its recorded digest.
    statement = json.loads(attest.provenance_statement(with_lock()))
    lock = next(
        d
        for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        if d["name"] == "lock"
    )
    lock["content"] = lock["content"][:-4] + "AAo="
    with pytest.raises(attest.ProvenanceError, match="does not match its digest"):
        attest.recipe_from(json.dumps(statement).encode())
    with pytest.raises(attest.ProvenanceError, match="not JSON"):
        attest.recipe_from(b"{")
    statement["predicate"]["buildDefinition"]["buildType"] = "https://example.com/other"
    with pytest.raises(attest.ProvenanceError, match="not packager's"):
        attest.recipe_from(json.dumps(statement).encode())
    # Valid JSON of another shape: a clear refusal, not a traceback.
    for other in (b"[]", b'{"_type": 1, "predicateType": []}', b"null"):
        with pytest.raises(attest.ProvenanceError):
            attest.recipe_from(other)
