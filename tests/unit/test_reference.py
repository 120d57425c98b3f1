from __future__ import annotations

from pathlib import Path

import pytest

from packager.errors import UsageError
from packager.reference import ModelReference, RefKind, parse_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:/wine/3", {"kind": RefKind.VERSION, "name": "wine", "version": "3"}),
        ("models:/wine/03", {"kind": RefKind.VERSION, "name": "wine", "version": "3"}),
        ("models:/wine@champion", {"kind": RefKind.ALIAS, "name": "wine", "alias": "champion"}),
        ("models:/wine/Production", {"kind": RefKind.STAGE, "stage": "Production"}),
        ("models:/wine/production", {"kind": RefKind.STAGE, "stage": "Production"}),
        ("models:/wine/STAGING", {"kind": RefKind.STAGE, "stage": "Staging"}),
        ("models:/wine/archived", {"kind": RefKind.STAGE, "stage": "Archived"}),
        ("models:/wine/None", {"kind": RefKind.STAGE, "stage": "None"}),
        ("models:/wine/latest", {"kind": RefKind.LATEST, "name": "wine"}),
        ("models:/wine/Latest", {"kind": RefKind.LATEST, "name": "wine"}),
        (
            "models:/m-2d3dc07ebe9a4a79b484d20a445858b4",
            {"kind": RefKind.LOGGED_MODEL, "model_id": "m-2d3dc07ebe9a4a79b484d20a445858b4"},
        ),
        (
            "runs:/0123abcd/model",
            {"kind": RefKind.RUN, "run_id": "0123abcd", "artifact_path": "model"},
        ),
        ("runs:/0123abcd/nested/model/", {"kind": RefKind.RUN, "artifact_path": "nested/model"}),
        ("models:/cat.schema.model/2", {"name": "cat.schema.model", "version": "2"}),
    ],
)
def test_parses_every_reference_form(text: str, expected: dict[str, object]) -> None:
    ref = parse_reference(text)
    for field, value in expected.items():
        assert getattr(ref, field) == value, field
    assert ref.raw == text


def test_canonical_uri_round_trips() -> None:
    for text in (
        "models:/a/1",
        "models:/a@b",
        "models:/a/Staging",
        "models:/a/latest",
        "runs:/r/model",
        "models:/m-0123456789abcdef",
    ):
        assert parse_reference(parse_reference(text).uri()).uri() == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model reference"),
        ("models:/wine", "expected exactly a model name"),
        ("models:/wine/3/extra", "expected exactly a model name"),
        ("models:/wine/prod", "'prod' is neither a version number"),
        ("models:/wine/0", "model versions start at 1"),
        ("models:/@champion", "an alias needs a model name"),
        ("models:/wine@", "an alias needs a model name"),
        ("models:/wine@champ/1", "an alias reference has no"),
        ("models://profile@databricks/wine/1", "models:// URIs"),
        ("runs:/", "expected runs:/RUN_ID/PATH"),
        ("runs:/abc", "expected runs:/RUN_ID/PATH"),
        ("s3://bucket/model", "unsupported model reference scheme 's3'"),
        ("./no/such/dir", "no such directory exists"),
    ],
)
def test_rejects_malformed_references(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_reference(text)
    assert info.value.exit_code == 2
    assert info.value.hint  # every rejection tells the user what to type instead


def test_local_directory_resolves_relative_to_cwd(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    ref = parse_reference("model", cwd=tmp_path)
    assert ref == ModelReference(
        raw="model", kind=RefKind.LOCAL, local_path=(tmp_path / "model").resolve()
    )
    assert not ref.needs_registry
    assert parse_reference(f"file://{tmp_path / 'model'}").kind is RefKind.LOCAL


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors: {}")
    with pytest.raises(UsageError, match="is a file, not a model directory"):
        parse_reference(str(tmp_path / "MLmodel"))
