from __future__ import annotations

import jinja2
import pytest

from packager.render import TemplateValueError, docker_value, environment, shell_quote


def test_templates_load_from_the_package() -> None:
    template = environment().get_template("inspect.txt.j2")
    assert template is not None


def test_undefined_variables_fail_loudly() -> None:
    template = environment().from_string("FROM {{ base_imgae }}\n")
    with pytest.raises(jinja2.UndefinedError):
        template.render(base_image="python:3.11-slim")


def test_shell_quote() -> None:
    assert shell_quote("plain") == "plain"
    assert shell_quote("it's; rm -rf /") == "'it'\"'\"'s; rm -rf /'"


def test_docker_value_is_single_quoted() -> None:
    # Docker expands $VAR inside double quotes and keeps JSON's \u escapes literally.
    assert docker_value('say "hi" $HOME') == "'say \"hi\" $HOME'"
    assert docker_value("it's café") == "'it'\\''s café'"


@pytest.mark.parametrize("value", ["a\nRUN curl evil", "a\rb", "a\0b", "a\x1b[2Jb"])
def test_line_breaks_cannot_escape_a_line(value: str) -> None:
    with pytest.raises(TemplateValueError):
        shell_quote(value)
    with pytest.raises(TemplateValueError):
        docker_value(value)
