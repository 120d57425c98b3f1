"""The one Jinja2 environment: templates ship inside the package (``packager/templates``).

``StrictUndefined`` makes a typo in a template fail loudly instead of rendering an empty
line. Autoescape is off (we render text, Dockerfiles and shell, not HTML); values that
reach a shell or a Dockerfile go through explicit filters that quote them and refuse
characters (newlines) that would let a value escape its line.
"""

from __future__ import annotations

import importlib.resources
import json
import shlex
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from packager.progress import human_size

if TYPE_CHECKING:
    import jinja2


class TemplateValueError(ValueError):
    """A value cannot be placed safely into a template."""


def _one_line(value: object) -> str:
    text = str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise TemplateValueError(f"value {text[:40]!r}… contains a line break or NUL")
    return text


def shell_quote(value: object) -> str:
    """Quote for a POSIX shell word."""
    return shlex.quote(_one_line(value))


def docker_value(value: object) -> str:
    """Quote for a Dockerfile ENV/LABEL value: a JSON string, which Docker parses alike."""
    return json.dumps(_one_line(value))


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
