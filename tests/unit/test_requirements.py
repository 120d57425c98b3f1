from __future__ import annotations

from pathlib import Path

import pytest

from packager.errors import ModelFormatError
from packager.spec.requirements import LineKind, parse_requirements_file


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_classifies_every_kind_of_line(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "requirements.txt": (
                "# a comment\n"
                "mlflow==3.17.2\n"
                "numpy>=1.24 ; python_version >= '3.10'  # inline comment\n"
                "scikit-learn[alldeps]==1.5.2\n"
                "--extra-index-url https://ci:t0ken-value@pkgs.example.com/simple\n"
                "-i https://pypi.org/simple\n"
                "--find-links=/opt/wheels\n"
                "/dbfs/FileStore/wheels/acme-1.0-py3-none-any.whl\n"
                "wheels/helper-0.1-py3-none-any.whl\n"
                "private @ https://user:pw@git.example.com/private-1.0.tar.gz\n"
                "pandas \\\n  ==2.2.0\n"
                "-c constraints.txt\n"
            ),
            "constraints.txt": "urllib3<2\n",
            "wheels/helper-0.1-py3-none-any.whl": "zip",
        },
    )
    lines = parse_requirements_file(tmp_path, "requirements.txt")
    by_text = {line.text: line for line in lines}
    assert [line.kind for line in lines] == [
        LineKind.REQUIREMENT,
        LineKind.REQUIREMENT,
        LineKind.REQUIREMENT,
        LineKind.EXTRA_INDEX_URL,
        LineKind.INDEX_URL,
        LineKind.FIND_LINKS,
        LineKind.LOCAL_WHEEL,
        LineKind.LOCAL_WHEEL,
        LineKind.REQUIREMENT,
        LineKind.REQUIREMENT,
        LineKind.REQUIREMENT,
    ]
    numpy = lines[1]
    assert (numpy.name, numpy.specifier, numpy.marker) == (
        "numpy",
        ">=1.24",
        'python_version >= "3.10"',
    )
    assert lines[2].extras == ("alldeps",)
    index = by_text["--extra-index-url https://pkgs.example.com/simple"]
    assert index.url == "https://pkgs.example.com/simple"
    absent = lines[6]
    assert (absent.absolute_path, absent.exists_in_model, absent.name) == (True, False, "acme")
    bundled = lines[7]
    assert (bundled.absolute_path, bundled.exists_in_model, bundled.name) == (False, True, "helper")
    direct = lines[8]
    assert direct.url == "https://git.example.com/private-1.0.tar.gz"
    assert "pw" not in direct.text
    assert (lines[9].name, lines[9].specifier, lines[9].line_no) == ("pandas", "==2.2.0", 11)
    constraint = lines[10]
    assert (constraint.name, constraint.constraint, constraint.file) == (
        "urllib3",
        True,
        "constraints.txt",
    )
    assert all("t0ken-value" not in line.text for line in lines)


def test_invalid_line_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, {"requirements.txt": "mlflow==3.17.2\nnot a requirement!!\n"})
    with pytest.raises(ModelFormatError, match=r"requirements.txt:2: 'not a requirement!!'"):
        parse_requirements_file(tmp_path, "requirements.txt")


def test_include_outside_the_model_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path, {"model/requirements.txt": "-r ../secrets.txt\n", "secrets.txt": "x\n"})
    with pytest.raises(ModelFormatError, match="not a file inside the model directory"):
        parse_requirements_file(tmp_path / "model", "requirements.txt")


def test_include_loop_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path, {"requirements.txt": "-r other.txt\n", "other.txt": "-r requirements.txt\n"})
    with pytest.raises(ModelFormatError, match="in a loop"):
        parse_requirements_file(tmp_path, "requirements.txt")


def test_credentials_are_removed_and_their_removal_is_recorded(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "requirements.txt": (
                "--extra-index-url https://ci:SECRET-in-model@pkgs.example.com/simple\n"
                "--index-url https://pypi.org/simple\n"
                "private @ https://user:SECRET-in-url@files.example.com/private-1.0.tar.gz\n"
                "public @ https://files.example.com/public-1.0-py3-none-any.whl\n"
                "six==1.17.0\n"
            )
        },
    )
    lines = parse_requirements_file(tmp_path, "requirements.txt")
    assert [line.had_credentials for line in lines] == [True, False, True, False, False]
    assert lines[0].url == "https://pkgs.example.com/simple"
    assert lines[2].url == "https://files.example.com/private-1.0.tar.gz"
    # The fact is kept, never the secret.
    assert "SECRET" not in repr(lines)
