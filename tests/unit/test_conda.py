"""The conda part of a lock, without a channel: specs, the conda-lock block, checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from packager.env.conda import channel_secrets, check_conda_lock, conda_specs
from packager.env.condalock import CondaLock, CondaPackage, normalize_depends, parse_conda_lock
from packager.env.lock import Lock, LockedPackage, parse_lock
from packager.env.target import Target
from packager.errors import LockError
from packager.spec.environment import CondaEnv

CHANNEL = "https://conda.example.com/acme"


def package(name: str, version: str, subdir: str = "linux-64", **extra: object) -> CondaPackage:
    fields: dict[str, object] = {
        "name": name,
        "version": version,
        "build": "h0_0",
        "subdir": subdir,
        "url": f"{CHANNEL}/{subdir}/{name}-{version}-h0_0.conda",
        "sha256": (name.encode().hex() * 64)[:64],
        "md5": (name.encode().hex() * 32)[:32],
        **extra,
    }
    return CondaPackage(**fields)  # type: ignore[arg-type]


CONDA = CondaLock(
    platform="linux-64",
    channels=(CHANNEL,),
    specs=("acme-tool", "python =3.12"),
    packages=(
        package("acme-tool", "2.0", depends=("__glibc >=2.17", "libacme >=1,<2")),
        package("libacme", "1.0"),
        package("python", "3.12.4"),
    ),
)
PIP = Lock(
    target=Target.make("3.12.4"),
    resolver="uv 0.13.9",
    inputs_digest="sha256:" + "0" * 64,
    index_url=None,
    extra_index_urls=(),
    packages=(LockedPackage(name="six", version="1.17.0", hashes=("sha256:" + "a" * 64,)),),
)


def env(*packages: str, python: str | None = "3.12") -> CondaEnv:
    return CondaEnv(channels=("acme",), python=python, conda_packages=packages, pip=())


def test_specs_take_python_from_the_file_or_the_flag() -> None:
    assert conda_specs(env("acme-tool")) == ("acme-tool", "python =3.12")
    assert conda_specs(env("acme-tool", python=">=3.11")) == ("acme-tool", "python >=3.11")
    assert conda_specs(env("acme-tool"), python="3.11") == ("acme-tool", "python 3.11.*")
    assert conda_specs(env("acme-tool"), python="3.11.9") == ("acme-tool", "python ==3.11.9")
    assert conda_specs(env("acme-tool", python=None)) == ("acme-tool",)


def test_conda_part_round_trips_through_conda_lock_models() -> None:
    parsed = parse_conda_lock(CONDA.text)
    assert parsed == CONDA
    assert parsed.python == "3.12.4"
    assert parsed.text == CONDA.text


def test_depends_are_kept_one_entry_per_name() -> None:
    assert normalize_depends(["python >=3.10", "libacme >=1", "libacme <2", "__glibc"]) == (
        "__glibc",
        "libacme >=1,<2",
        "python >=3.10",
    )


def test_conda_lock_parser_reads_the_conda_part(tmp_path: Path) -> None:
    from conda_lock.lockfile import parse_conda_lock_file  # type: ignore[import-untyped]

    path = tmp_path / "conda-lock.yml"
    path.write_text(CONDA.text)
    parsed = parse_conda_lock_file(path)
    tool = next(p for p in parsed.package if p.name == "acme-tool")
    assert tool.url == f"{CHANNEL}/linux-64/acme-tool-2.0-h0_0.conda"
    assert tool.hash.sha256 == CONDA.packages[0].sha256
    assert tool.dependencies == {"__glibc": ">=2.17", "libacme": ">=1,<2"}
    assert [c.url for c in parsed.metadata.channels] == [CHANNEL]


def test_lock_carries_the_conda_part_inside_and_its_digest_covers_it() -> None:
    pip_only = PIP.render()
    assert "#|" not in pip_only
    with_conda = replace(PIP, conda=CONDA)
    text = with_conda.render()
    assert text.startswith(pip_only)  # the pip part is unchanged, the conda part follows
    assert all(line.startswith("#") for line in text[len(pip_only) :].splitlines())
    again = parse_lock(text)
    assert again == with_conda
    assert again.render() == text
    assert parse_lock(pip_only).conda is None
    changed = replace(CONDA, packages=(*CONDA.packages[:2], package("python", "3.12.5")))
    assert replace(PIP, conda=changed).digest != with_conda.digest != PIP.digest


def test_credentials_never_reach_the_conda_part() -> None:
    secret = "https://user:t0ps3cret@conda.example.com/t/tk-123456/acme"
    leaky = replace(
        CONDA,
        channels=(secret,),
        packages=(package("libacme", "1.0", url=f"{secret}/linux-64/libacme-1.0-h0_0.conda"),),
    )
    text = leaky.text
    assert "t0ps3cret" not in text
    assert "tk-123456" not in text
    assert "user:" not in text
    assert "https://conda.example.com/t/***/acme/linux-64/libacme-1.0-h0_0.conda" in text


def test_only_url_user_info_is_scrubbed_from_solver_messages() -> None:
    assert channel_secrets(["conda-forge", "https://me:t0ps3cret@host/acme"]) == ["t0ps3cret"]


def test_kept_lock_is_checked_against_conda_yaml() -> None:
    check_conda_lock(CONDA, env("acme-tool", "libacme >=1"), "linux/amd64", source="kept")
    with pytest.raises(LockError, match="are for linux-64, the image needs linux-aarch64"):
        check_conda_lock(CONDA, env("acme-tool"), "linux/arm64", source="kept")
    with pytest.raises(LockError) as missing:
        check_conda_lock(CONDA, env("acme-tool", "acme-py"), "linux/amd64", source="kept")
    assert "acme-py (acme-py) is not in the lock's conda part" in str(missing.value)
    with pytest.raises(LockError) as old:
        check_conda_lock(CONDA, env("libacme <1"), "linux/amd64", source="kept")
    assert "libacme=1.0 does not satisfy libacme <1" in str(old.value)
    with pytest.raises(LockError, match=r"python=3\.12\.4 does not satisfy python 3\.11"):
        check_conda_lock(CONDA, env("acme-tool"), "linux/amd64", source="kept", python="3.11")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nmetadata: [", "not a valid conda-lock file"),
        ("version: 3\n", "conda-lock version 3 is not 1 or 2"),
        ("- a list\n", "not a conda-lock file"),
    ],
)
def test_malformed_conda_part_is_refused(text: str, message: str) -> None:
    with pytest.raises(LockError, match=message):
        parse_conda_lock(text)


def test_conda_part_for_two_platforms_is_refused() -> None:
    text = CONDA.text.replace(
        "  platforms:\n  - linux-64\n", "  platforms:\n  - linux-64\n  - osx-64\n"
    )
    assert "osx-64" in text
    with pytest.raises(LockError, match="locks 2 platforms"):
        parse_conda_lock(text)
