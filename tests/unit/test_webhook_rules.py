"""The rules file: matching events to releases, and errors that name the line and key."""

from __future__ import annotations

import pytest

from packager.errors import UsageError
from packager.image.base import validate_reference
from packager.webhook.rules import (
    ALIAS_CREATED,
    TAG_SET,
    VERSION_CREATED,
    BadEvent,
    Event,
    ReleaseChoices,
    parse_event,
    parse_rules,
)

RULES = """\
rules:
  - models: "fraud-*"
    aliases: [champion]
    image: "reg.example:5000/serving/{name}:{alias}-{version}"
    release: {test: false, alias: live}
  - models: ["churn", "churn-*"]
    image: "reg.example:5000/serving/{name}:{version}"
  - models: "*"
    tags: {deploy: "true"}
    image: "reg.example:5000/tagged/{name}:{version}"
  - models: "fraud-*"
    tags: [ship]
    image: "reg.example:5000/serving/{name}:{version}"
"""


def test_alias_event_matches_alias_rule_only() -> None:
    rules = parse_rules(RULES)
    jobs = rules.plan(Event(kind=ALIAS_CREATED, name="fraud-eu", version="7", alias="champion"))
    assert [(j.model, j.image) for j in jobs] == [
        ("models:/fraud-eu/7", "reg.example:5000/serving/fraud-eu:champion-7")
    ]
    assert jobs[0].release == ReleaseChoices(test=False, alias="live")
    assert jobs[0].rule_line == 2
    other_alias = Event(kind=ALIAS_CREATED, name="fraud-eu", version="7", alias="challenger")
    assert rules.plan(other_alias) == ()


def test_new_version_matches_rules_without_aliases_or_tags() -> None:
    rules = parse_rules(RULES)
    assert [
        j.image for j in rules.plan(Event(kind=VERSION_CREATED, name="churn-us", version="2"))
    ] == ["reg.example:5000/serving/churn-us:2"]
    assert rules.plan(Event(kind=VERSION_CREATED, name="fraud-eu", version="2")) == ()
    assert rules.plan(Event(kind=VERSION_CREATED, name="churnx", version="2")) == ()


def test_tag_rules_match_key_and_value() -> None:
    rules = parse_rules(RULES)

    def images(name: str, key: str, value: str) -> list[str]:
        event = Event(kind=TAG_SET, name=name, version="3", tag_key=key, tag_value=value)
        return [j.image for j in rules.plan(event)]

    assert images("churn", "deploy", "true") == ["reg.example:5000/tagged/churn:3"]
    assert images("churn", "deploy", "false") == []
    assert images("fraud-a", "ship", "anything") == ["reg.example:5000/serving/fraud-a:3"]
    assert images("churn", "ship", "anything") == []


def test_two_rules_naming_one_image_make_one_job() -> None:
    rules = parse_rules(
        "rules:\n"
        "  - {models: 'a*', image: 'r.example/x/{name}:{version}'}\n"
        "  - {models: '*b', image: 'r.example/x/{name}:{version}'}\n"
    )
    assert len(rules.plan(Event(kind=VERSION_CREATED, name="ab", version="1"))) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "rules file is empty"),
        ("rules: [\n", "rules:2: not valid YAML"),
        ("rulez: []\n", "rules:1: (top level).rulez: unknown key"),
        ("rules: []\n", "rules:1: rules: must be a non-empty list"),
        ("rules:\n  - image: 'r/x:{version}'\n", 'rules:2: rules[0]: needs "models"'),
        (
            "rules:\n  - models: a\n    image: 'r/{nme}'\n",
            "rules:3: rules[0].image: unknown placeholder {nme}",
        ),
        (
            "rules:\n  - models: a\n    image: 'r/{name}:{alias}'\n",
            "{alias} needs the rule to list aliases",
        ),
        (
            "rules:\n  - models: a\n    aliases: []\n    image: r/x\n",
            "rules:3: rules[0].aliases: must not be an empty list",
        ),
        (
            "rules:\n  - models: a\n    image: r/x\n    release: {test: yes please}\n",
            "rules:4: rules[0].release.test: must be true or false",
        ),
        (
            "rules:\n  - models: a\n    image: r/x\n    release: {backend: podman}\n",
            "rules:4: rules[0].release.backend: must be oci or docker",
        ),
        (
            "rules:\n  - models: a\n    image: r/x\n    imagee: r/y\n",
            "rules:4: rules[0].imagee: unknown key",
        ),
        (
            "rules:\n  - models: a\n    image: r/x\n    models: b\n",
            "rules:4: rules[0].models: given twice",
        ),
        ("rules:\n  - models: a\n    image: 'r/{name'\n", "rules[0].image: not a valid template"),
        ("rules:\n  - models: a\n    image: 'r/{name!r}'\n", "{name} takes no format spec"),
    ],
)
def test_bad_file_names_line_and_key(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_rules(text)
    assert message in caught.value.message


def test_parse_mlflow_example_payloads() -> None:
    from mlflow.entities.webhook import WebhookEvent
    from mlflow.webhooks.types import get_example_payload_for_event

    def body(entity: str, action: str) -> dict[str, object]:
        event = WebhookEvent(entity, action)
        data = get_example_payload_for_event(event)
        return {"entity": entity, "action": action, "timestamp": "x", "data": data}

    assert parse_event(body("model_version", "created")) == Event(
        kind=VERSION_CREATED, name="example_model", version="1"
    )
    assert parse_event(body("model_version_alias", "created")) == Event(
        kind=ALIAS_CREATED, name="example_model", version="1", alias="example_alias"
    )
    assert parse_event(body("model_version_tag", "set")) == Event(
        kind=TAG_SET,
        name="example_model",
        version="1",
        tag_key="example_key",
        tag_value="example_value",
    )
    assert parse_event(body("registered_model", "created")) is None


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"entity": "model_version"},
        {"entity": "model_version", "action": "created", "data": {"name": "m"}},
        {
            "entity": "model_version_alias",
            "action": "created",
            "data": {"name": "m", "version": "1"},
        },
    ],
)
def test_malformed_events_are_refused(payload: object) -> None:
    with pytest.raises(BadEvent):
        parse_event(payload)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Changed to fit: the original name's hash keeps it apart from the others.
        ("FraudModel", "reg.example:5000/tagged/fraudmodel-f2a206a9:7"),
        ("fraud model", "reg.example:5000/tagged/fraud-model-8ddd6434:7"),
        ("Fraud__Model (v2)!", "reg.example:5000/tagged/fraud-model-v2-50a6a411:7"),
        ("_.odd.-", "reg.example:5000/tagged/odd-1f09e952:7"),
        # Already valid: as it is.
        ("fraudmodel", "reg.example:5000/tagged/fraudmodel:7"),
        ("fraud-model", "reg.example:5000/tagged/fraud-model:7"),
        ("fraud.model_v2", "reg.example:5000/tagged/fraud.model_v2:7"),
    ],
)
def test_model_names_become_valid_image_references(name: str, expected: str) -> None:
    event = Event(kind=TAG_SET, name=name, version="7", tag_key="deploy", tag_value="true")
    [job] = parse_rules(RULES).plan(event)
    assert job.image == expected
    assert validate_reference(job.image) == expected
    assert job.name == name  # the model itself keeps its name


def test_names_that_differ_only_in_case_or_punctuation_never_share_an_image() -> None:
    rules = parse_rules(RULES)
    names = ["FraudModel", "fraudmodel", "Fraudmodel", "fraud model", "fraud-model", "Fraud Model"]
    images = set()
    for name in names:
        event = Event(kind=TAG_SET, name=name, version="7", tag_key="deploy", tag_value="true")
        [job] = rules.plan(event)
        images.add(job.image)
    assert len(images) == len(names)
