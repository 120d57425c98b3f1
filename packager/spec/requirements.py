"""Parse a model's ``requirements.txt`` (and the files it includes) into typed lines.

Only parsing happens here: nothing is resolved or downloaded (that is the ``env`` stage).
Every line is classified so that later stages can act on it without re-reading text:
a PEP 508 requirement, a local wheel (absolute paths such as ``/dbfs/…/lib.whl`` that
will not exist at build time, or ``wheels/x.whl`` inside the model), an index option
(credentials stripped), or an included/constraints file (followed, inside the model).
"""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from packager.errors import ModelFormatError
from packager.redact import redact_uri, redact_uris_in

_MAX_INCLUDE_DEPTH = 10


class LineKind(str, enum.Enum):
    REQUIREMENT = "requirement"  # PEP 508, possibly with a direct URL
    LOCAL_WHEEL = "local_wheel"  # a path to a .whl file
    LOCAL_PATH = "local_path"  # a path to a project directory or sdist
    INDEX_URL = "index_url"
    EXTRA_INDEX_URL = "extra_index_url"
    FIND_LINKS = "find_links"
    TRUSTED_HOST = "trusted_host"
    NO_INDEX = "no_index"
    EDITABLE = "editable"
    OTHER_OPTION = "other_option"


_VALUE_OPTIONS = {
    "-i": LineKind.INDEX_URL,
    "--index-url": LineKind.INDEX_URL,
    "--extra-index-url": LineKind.EXTRA_INDEX_URL,
    "-f": LineKind.FIND_LINKS,
    "--find-links": LineKind.FIND_LINKS,
    "--trusted-host": LineKind.TRUSTED_HOST,
}


@dataclass(frozen=True, kw_only=True)
class RequirementLine:
    """One meaningful line of a requirements file."""

    kind: LineKind
    text: str  # the line as written, credentials stripped
    file: str  # relative to the model directory
    line_no: int
    constraint: bool = False  # came from a -c file: limits versions, installs nothing
    name: str | None = None  # canonical project name (requirements, wheels)
    specifier: str | None = None
    marker: str | None = None
    extras: tuple[str, ...] = ()
    url: str | None = None  # direct URL or option value, credentials stripped
    # The URL carried credentials (user info, a token query), which were removed: the env
    # stage refuses to guess them (see env/inputs.py). The secret itself is never kept.
    had_credentials: bool = False
    path: str | None = None  # local wheel/project path as written
    absolute_path: bool = False
    exists_in_model: bool = False  # relative path that resolves to a file inside the model


def parse_requirements_file(model_dir: Path, relative: str) -> tuple[RequirementLine, ...]:
    """Parse ``model_dir/relative``, following ``-r`` and ``-c`` includes inside the model."""
    return read_requirements(model_dir, relative)[0]


def read_requirements(
    model_dir: Path, relative: str
) -> tuple[tuple[RequirementLine, ...], frozenset[str]]:
    """The lines of ``relative`` (as :func:`parse_requirements_file`) and every file pip
    would read for it: the file and what it includes with ``-r``/``-c``, transitively,
    whatever their names. Each may name an index with its password, so each is shipped
    with credentials removed."""
    read: set[str] = set()
    lines = _parse(model_dir, relative, constraint=False, depth=0, seen=set(), read=read)
    return tuple(lines), frozenset(read)


def files_included_by(model_dir: Path, relative: str, entries: tuple[str, ...]) -> frozenset[str]:
    """The requirement files that ``-r``/``-c`` entries of ``relative``'s pip list (a
    ``python_env.yaml`` or ``conda.yaml``) name, with everything they include. Entries that
    point outside the model are not followed: the env stage never reads them."""
    found: set[str] = set()
    for entry in entries:
        option, value = _split_option(entry.strip())
        if option not in ("-r", "--requirement", "-c", "--constraint") or not value:
            continue
        target = (model_dir / PurePosixPath(relative).parent / value).resolve()
        if target.is_file() and target.is_relative_to(model_dir.resolve()):
            found |= read_requirements(
                model_dir, target.relative_to(model_dir.resolve()).as_posix()
            )[1]
    return frozenset(found)


def _parse(
    model_dir: Path,
    relative: str,
    *,
    constraint: bool,
    depth: int,
    seen: set[str],
    read: set[str],
) -> list[RequirementLine]:
    if depth > _MAX_INCLUDE_DEPTH or relative in seen:
        raise ModelFormatError(f"{relative}: requirement files include each other in a loop")
    seen = seen | {relative}
    read.add(relative)
    path = model_dir / relative
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ModelFormatError(f"cannot read {relative} in {model_dir}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ModelFormatError(
            f"{relative} in {model_dir} is not UTF-8 text (byte {err.start}: {err.reason})",
            hint="pip reads requirement files as UTF-8: save the file as UTF-8 and log the "
            "model again",
        ) from err
    lines: list[RequirementLine] = []
    for line_no, line in _logical_lines(text):
        where = f"{relative}:{line_no}"
        if line.startswith(("-r ", "--requirement ", "-c ", "--constraint ", "-r", "-c")):
            option, value = _split_option(line)
            if option in ("-r", "--requirement", "-c", "--constraint") and value:
                include = _inside_model(model_dir, relative, value, where)
                lines += _parse(
                    model_dir,
                    include,
                    constraint=constraint or option in ("-c", "--constraint"),
                    depth=depth + 1,
                    seen=seen,
                    read=read,
                )
                continue
        lines.append(
            _classify(
                model_dir,
                relative,
                line,
                base={"file": relative, "line_no": line_no, "constraint": constraint},
                where=where,
            )
        )
    return lines


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines without comments, with backslash continuations joined (pip's rules)."""
    result: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw
        # pip treats " #" as the start of a comment, but not "#" inside a URL fragment.
        if line.lstrip().startswith("#"):
            line = ""
        elif " #" in line:
            line = line[: line.index(" #")]
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            result.append((start, full))
    if pending.strip():
        result.append((start, pending.strip()))
    return result


def _split_option(line: str) -> tuple[str, str]:
    if line.startswith("--") and "=" in line.split(maxsplit=1)[0]:
        option, _, value = line.partition("=")
        return option.strip(), value.strip()
    parts = line.split(None, 1)
    if len(parts) == 1 and len(parts[0]) > 2 and parts[0][:2] in ("-r", "-c", "-i", "-f", "-e"):
        return parts[0][:2], parts[0][2:]
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def _inside_model(model_dir: Path, relative: str, value: str, where: str) -> str:
    target = (PurePosixPath(relative).parent / value).as_posix()
    resolved = (model_dir / target).resolve()
    if not resolved.is_relative_to(model_dir.resolve()) or not resolved.is_file():
        raise ModelFormatError(
            f"{where}: includes {value!r}, which is not a file inside the model directory",
            hint="log the model with the constraints file (MLflow copies -c files into the "
            "model as constraints.txt)",
        )
    return resolved.relative_to(model_dir.resolve()).as_posix()


def _classify(
    model_dir: Path, relative: str, line: str, *, base: dict[str, Any], where: str
) -> RequirementLine:
    if line.startswith("-"):
        option, value = _split_option(line)
        if option in _VALUE_OPTIONS:
            redacted = redact_uri(value)
            return RequirementLine(
                kind=_VALUE_OPTIONS[option],
                text=f"{option} {redacted}",
                url=redacted,
                had_credentials=redacted != value,
                **base,
            )
        if option == "--no-index":
            return RequirementLine(kind=LineKind.NO_INDEX, text=line, **base)
        if option in ("-e", "--editable"):
            return RequirementLine(
                kind=LineKind.EDITABLE, text=redact_uris_in(line), path=value, **base
            )
        return RequirementLine(kind=LineKind.OTHER_OPTION, text=redact_uris_in(line), **base)
    first = shlex.split(line, comments=False, posix=True)[0] if line else line
    if _looks_like_path(first):
        return _local_path(model_dir, relative, first, base)
    try:
        req = Requirement(line)
    except InvalidRequirement as err:
        raise ModelFormatError(
            f"{where}: {line!r} is not a valid requirement ({err})",
            hint="fix the line in the model's requirements.txt and log the model again",
        ) from err
    return RequirementLine(
        kind=LineKind.REQUIREMENT,
        text=redact_uris_in(line),
        name=canonicalize_name(req.name),
        specifier=str(req.specifier) or None,
        marker=str(req.marker) if req.marker else None,
        extras=tuple(sorted(req.extras)),
        url=redact_uri(req.url) if req.url else None,
        had_credentials=bool(req.url) and redact_uri(req.url or "") != req.url,
        **base,
    )


def _looks_like_path(token: str) -> bool:
    if token.startswith(("/", "./", "../", "~", "file:")):
        return True
    return token.endswith((".whl", ".tar.gz", ".zip")) and "://" not in token


def _local_path(
    model_dir: Path, relative: str, token: str, base: dict[str, Any]
) -> RequirementLine:
    path = token.removeprefix("file://") if token.startswith("file://") else token
    absolute = path.startswith(("/", "~"))
    exists = False
    if not absolute:
        candidate = (model_dir / PurePosixPath(relative).parent / path).resolve()
        exists = candidate.is_file() and candidate.is_relative_to(model_dir.resolve())
    name = None
    if path.endswith(".whl"):
        from packaging.utils import InvalidWheelFilename, parse_wheel_filename  # noqa: PLC0415

        try:
            name = str(parse_wheel_filename(PurePosixPath(path).name)[0])
        except InvalidWheelFilename:
            name = None
    return RequirementLine(
        kind=LineKind.LOCAL_WHEEL if path.endswith(".whl") else LineKind.LOCAL_PATH,
        text=token,
        name=name,
        path=path,
        absolute_path=absolute,
        exists_in_model=exists,
        **base,
    )
