"""The rules file: which registry events start which release.

``--rules FILE`` is YAML::

    rules:
      - models: "fraud-*"              # glob (or a list of globs) on the model name
        aliases: [champion]             # alias moves that trigger; omit both aliases and
        tags: {deploy: "true"}          #   tags for "every new version"
        image: "registry.example.com/serving/{name}:{version}"
        release: {test: true, backend: oci, attestations: true, alias: live}

Every rule that matches an event yields one job. The file is checked whole when it is
loaded, and each error names the line and the key (``rules.yaml:4: rules[0].aliases: …``):
a receiver must not start with rules it would only find wrong when an event arrives.

Events are parsed here too (:func:`parse_event`), into :class:`Event`; an event that no
rule matches, or of a kind packager does not act on, is acknowledged and ignored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from packager.errors import UsageError

VERSION_CREATED = "model_version.created"
ALIAS_CREATED = "model_version_alias.created"
TAG_SET = "model_version_tag.set"
EVENTS = (VERSION_CREATED, ALIAS_CREATED, TAG_SET)
_PLACEHOLDERS = frozenset({"name", "version", "alias"})
_RULE_KEYS = frozenset({"models", "aliases", "tags", "image", "release"})
_RELEASE_KEYS = frozenset({"test", "backend", "attestations", "alias", "force"})


class BadEvent(Exception):  # noqa: N818 — the receiver's reason to answer 400
    """The body is not an MLflow event packager can read."""


@dataclass(frozen=True, kw_only=True)
class Event:
    """One registry event; ``alias`` and ``tag_*`` are set for their own event kinds."""

    kind: str  # "entity.action"
    name: str
    version: str
    alias: str | None = None
    tag_key: str | None = None
    tag_value: str | None = None


@dataclass(frozen=True, kw_only=True)
class ReleaseChoices:
    """The release options a rule may set (the rest are ``ReleaseOptions`` defaults)."""

    test: bool = True
    backend: Literal["oci", "docker"] = "oci"
    attestations: bool = True
    alias: str | None = None  # moved to the version once released (not the event's alias)
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class Rule:
    models: tuple[str, ...]
    aliases: tuple[str, ...] | None
    tags: Mapping[str, str | None] | None  # key → required value (None: any value)
    image: str
    release: ReleaseChoices
    line: int  # where the rule starts in its file, for logs

    def matches(self, event: Event) -> bool:
        if not any(fnmatch.fnmatchcase(event.name, glob) for glob in self.models):
            return False
        if event.kind == VERSION_CREATED:
            return self.aliases is None and self.tags is None
        if event.kind == ALIAS_CREATED:
            return self.aliases is not None and event.alias in self.aliases
        if event.kind != TAG_SET or self.tags is None or event.tag_key is None:
            return False
        if event.tag_key not in self.tags:
            return False
        wanted = self.tags[event.tag_key]
        return wanted is None or wanted == event.tag_value

    def image_for(self, name: str, version: str, alias: str | None = None) -> str:
        """The rule's image for a version, its placeholders made fit for a reference."""
        return self.image.format(
            name=reference_part(name), version=reference_part(version), alias=reference_part(alias)
        )


def reference_part(value: str | None) -> str:
    """``value`` as an image repository path component (which a tag also accepts):
    lower case, runs of other characters than ``a-z0-9`` and single separators made one
    ``-``, no separator at either end. MLflow allows ``FraudModel`` or ``fraud model``
    as model names; a reference does not.

    A value that had to change gets the first 8 hex digits of its sha256 appended
    (``FraudModel`` → ``fraudmodel-<hash>``): MLflow's names are case-sensitive, and
    ``FraudModel`` and ``fraudmodel`` (or ``fraud model`` and ``fraud-model``) are two
    models that must never push to one image. A value that is already a valid component
    stays as it is."""
    if not value:
        return ""
    text = re.sub(r"[^a-z0-9._-]+", "-", value.lower())
    text = re.sub(r"[._-]{2,}", "-", text).strip("._-") or "model"
    if text == value:
        return text
    return f"{text}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a worker needs to run one release; stored as JSON in the queue."""

    model: str  # models:/NAME/VERSION
    name: str
    version: str
    image: str
    event: str
    rule_line: int
    release: ReleaseChoices
    # The alias whose move made the job (alias rules only); before moving
    # ``release.alias`` the worker checks it still points at this version.
    trigger_alias: str | None = None
    # The rule releases each model's newest version (no aliases, no tags): the alias is
    # moved only while no newer version exists.
    newest_only: bool = False

    @property
    def key(self) -> str:
        """Two pending jobs with the same key would do the same release."""
        return f"{self.model} -> {self.image}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        fields = dict(data)
        fields["release"] = ReleaseChoices(**fields["release"])
        return cls(**fields)


@dataclass(frozen=True, kw_only=True)
class Rules:
    rules: tuple[Rule, ...]
    source: str

    def plan(self, event: Event) -> tuple[JobSpec, ...]:
        """One job per matching rule (two rules naming the same image make one job)."""
        jobs: dict[str, JobSpec] = {}
        for rule in self.rules:
            if rule.matches(event):
                job = JobSpec(
                    model=f"models:/{event.name}/{event.version}",
                    name=event.name,
                    version=event.version,
                    image=rule.image_for(event.name, event.version, event.alias),
                    event=event.kind,
                    rule_line=rule.line,
                    release=rule.release,
                    trigger_alias=event.alias if rule.aliases is not None else None,
                    newest_only=rule.aliases is None and rule.tags is None,
                )
                jobs.setdefault(job.key, job)
        return tuple(jobs.values())


def parse_event(payload: object) -> Event | None:
    """The event in a delivery's JSON body; ``None`` for kinds packager ignores."""
    if not isinstance(payload, dict):
        raise BadEvent("the body is not a JSON object")
    entity, action, data = payload.get("entity"), payload.get("action"), payload.get("data")
    if not isinstance(entity, str) or not isinstance(action, str) or not isinstance(data, dict):
        raise BadEvent('the body needs "entity" and "action" strings and a "data" object')
    kind = f"{entity}.{action}"
    if kind not in EVENTS:
        return None
    text = {k: str(v) for k, v in data.items() if isinstance(v, (str, int))}
    missing = [k for k in _needed(kind) if not text.get(k)]
    if missing:
        raise BadEvent(f"a {kind} event needs data.{', data.'.join(missing)}")
    return Event(
        kind=kind,
        name=text["name"],
        version=text["version"],
        alias=text.get("alias") if kind == ALIAS_CREATED else None,
        tag_key=text.get("key") if kind == TAG_SET else None,
        tag_value=text.get("value", "") if kind == TAG_SET else None,
    )


def _needed(kind: str) -> tuple[str, ...]:
    extra = {ALIAS_CREATED: ("alias",), TAG_SET: ("key",)}.get(kind, ())
    return ("name", "version", *extra)


# --- loading -------------------------------------------------------------------------


class _Where:
    """A file name and YAML node, for errors that say ``FILE:LINE: PATH: problem``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: yaml.Node, path: str, problem: str) -> UsageError:
        return UsageError(
            f"{self.source}:{node.start_mark.line + 1}: {path}: {problem}",
            hint="see `packager webhook serve --help` for the rules file's shape",
        )


def load_rules(path: Path) -> Rules:
    """Read and check the rules file; a bad file raises :class:`UsageError`."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"cannot read the rules file {path}: {err.strerror}") from err
    return parse_rules(text, source=str(path))


def parse_rules(text: str, *, source: str = "rules") -> Rules:
    where = _Where(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UsageError(f"{source}{line}: not valid YAML: {problem}") from err
    if root is None:
        raise UsageError(f"{source}: the rules file is empty", hint='it needs a "rules:" list')
    top = _mapping(where, root, "(top level)", frozenset({"rules"}))
    if "rules" not in top:
        raise where.error(root, "(top level)", 'needs a "rules:" list')
    items = top["rules"][1]
    if not isinstance(items, yaml.SequenceNode) or not items.value:
        raise where.error(items, "rules", "must be a non-empty list of rules")
    return Rules(
        rules=tuple(_rule(where, node, f"rules[{i}]") for i, node in enumerate(items.value)),
        source=source,
    )


def _mapping(
    where: _Where, node: yaml.Node, path: str, allowed: frozenset[str]
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's entries by key (key node kept for its line); unknown keys refused."""
    if not isinstance(node, yaml.MappingNode):
        raise where.error(node, path, "must be a mapping")
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, value in node.value:
        name = str(key.value)
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise where.error(key, f"{path}.{name}", f"unknown key (known: {known})")
        if name in entries:
            raise where.error(key, f"{path}.{name}", "given twice")
        entries[name] = (key, value)
    return entries


def _scalar(where: _Where, node: yaml.Node, path: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.value == "":
        raise where.error(node, path, "must be a non-empty string")
    return str(node.value)


def _strings(where: _Where, node: yaml.Node, path: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise where.error(node, path, "must not be an empty list")
        return tuple(_scalar(where, item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return (_scalar(where, node, path),)


def _tags(where: _Where, node: yaml.Node, path: str) -> dict[str, str | None]:
    """``{key: value}`` (value required) or a list of keys (any value)."""
    if isinstance(node, yaml.MappingNode):
        return {
            _scalar(where, key, path): _scalar(where, value, f"{path}.{key.value}")
            for key, value in node.value
        }
    return dict.fromkeys(_strings(where, node, path))


def _rule(where: _Where, node: yaml.Node, path: str) -> Rule:
    entries = _mapping(where, node, path, _RULE_KEYS)
    for required in ("models", "image"):
        if required not in entries:
            raise where.error(node, path, f'needs "{required}"')
    aliases = (
        _strings(where, entries["aliases"][1], f"{path}.aliases") if "aliases" in entries else None
    )
    tags = _tags(where, entries["tags"][1], f"{path}.tags") if "tags" in entries else None
    image_node = entries["image"][1]
    image = _scalar(where, image_node, f"{path}.image")
    _check_template(where, image_node, f"{path}.image", image, has_alias=aliases is not None)
    release = (
        _release(where, entries["release"][1], f"{path}.release")
        if "release" in entries
        else ReleaseChoices()
    )
    return Rule(
        models=_strings(where, entries["models"][1], f"{path}.models"),
        aliases=aliases,
        tags=tags,
        image=image,
        release=release,
        line=node.start_mark.line + 1,
    )


def _check_template(
    where: _Where, node: yaml.Node, path: str, text: str, *, has_alias: bool
) -> None:
    try:
        parts = [
            (f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None
        ]
    except ValueError as err:
        raise where.error(node, path, f"not a valid template: {err}") from err
    for field, spec, conversion in parts:
        if field not in _PLACEHOLDERS:
            raise where.error(
                node,
                path,
                f"unknown placeholder {{{field}}} (use {{name}}, {{version}}, {{alias}})",
            )
        if spec or conversion:
            raise where.error(node, path, f"{{{field}}} takes no format spec or conversion")
        if field == "alias" and not has_alias:
            raise where.error(node, path, "{alias} needs the rule to list aliases")


def _release(where: _Where, node: yaml.Node, path: str) -> ReleaseChoices:
    entries = _mapping(where, node, path, _RELEASE_KEYS)
    flags: dict[str, bool] = {}
    for key in ("test", "attestations", "force"):
        if key in entries:
            value = entries[key][1]
            if not isinstance(value, yaml.ScalarNode) or value.tag != "tag:yaml.org,2002:bool":
                raise where.error(value, f"{path}.{key}", "must be true or false")
            flags[key] = yaml.safe_load(value.value) is True
    backend = "oci"
    if "backend" in entries:
        backend = _scalar(where, entries["backend"][1], f"{path}.backend")
        if backend not in ("oci", "docker"):
            raise where.error(entries["backend"][1], f"{path}.backend", "must be oci or docker")
    alias = _scalar(where, entries["alias"][1], f"{path}.alias") if "alias" in entries else None
    return ReleaseChoices(backend="docker" if backend == "docker" else "oci", alias=alias, **flags)
