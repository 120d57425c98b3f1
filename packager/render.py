"""The one Jinja2 environment: templates ship inside the package (``packager/templates``).

``StrictUndefined`` makes a typo in a template fail loudly instead of rendering an empty
line. Autoescape is off (we render text, Dockerfiles and shell, not HTML); values that
reach a shell or a Dockerfile go through explicit filters that quote them and refuse
characters (newlines) that would let a value escape its line.
"""

from __future__ import annotations

import importlib.resources
import shlex
import unicodedata
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from packager.progress import human_size

if TYPE_CHECKING:
    import jinja2


class TemplateValueError(ValueError):
    """A value cannot be placed safely into a template."""


def value_problem(value: str, max_length: int | None = None) -> str | None:
    """What makes ``value`` unfit to be one line of a template (a label, an ENV value, a
    name in a log line), or None: a control character (a line break ends the instruction,
    and forges log lines), or more than ``max_length`` characters."""
    if max_length is not None and len(value) > max_length:
        return f"is {len(value)} characters long (at most {max_length})"
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"contains the control character {bad!r}"
    return None


def _one_line(value: object) -> str:
    text = str(value)
    problem = value_problem(text)
    if problem:
        raise TemplateValueError(f"value {text[:40]!r}… {problem}")
    return text


def shell_quote(value: object) -> str:
    """Quote for a POSIX shell word."""
    return shlex.quote(_one_line(value))


def docker_value(value: object) -> str:
    """Quote for a Dockerfile ENV/LABEL key or value so that the engine reads it back
    byte for byte: single quotes, where Docker's word parser expands no ``$VAR`` and
    interprets no backslash (a JSON string was still expanded, and its ``\u00e9``
    escapes were kept literally); a quote inside closes, escapes and reopens (``'\''``).
    UTF-8 is written as it is."""
    return "'" + _one_line(value).replace("'", "'\\''") + "'"


def _loader(name: str) -> str:
    import jinja2  # noqa: PLC0415 - imported when a template is rendered, not at start-up

    resource = importlib.resources.files("packager").joinpath("templates").joinpath(name)
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise jinja2.TemplateNotFound(name) from err


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    import jinja2  # noqa: PLC0415 - imported when a template is rendered, not at start-up

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_loader),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - not HTML; see the module docstring
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shell_quote"] = shell_quote
    env.filters["docker_value"] = docker_value
    env.filters["human_size"] = human_size
    return env


def render(name: str, **context: Any) -> str:
    """Render ``templates/<name>``; every variable the template uses must be passed."""
    return environment().get_template(name).render(**context)
