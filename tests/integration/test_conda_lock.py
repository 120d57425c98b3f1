"""`packager lock` on models whose conda.yaml lists conda packages: solved with py-rattler
against a real channel built in the fixtures (tests/fixtures/conda), served as file:// and
over HTTP with basic auth on 127.0.0.1. The pip part is resolved by uv against PyPI.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from packager.cli import main
from packager.env.conda import solve_conda
from packager.env.condalock import parse_conda_lock
from packager.env.condapkgs import fetch_conda_packages
from packager.env.condaprefix import install_prefix
from packager.env.lock import read_lock
from packager.errors import HashMismatchError, IndexAuthError, LockError
from packager.spec.environment import CondaEnv
from tests.fixtures.conda.channel import build_channel
from tests.fixtures.conda.server import serve_channel
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_channel(tmp_path_factory.getbasetemp() / "conda-channel")


def conda_model(tmp_path: Path, *dependencies: str, channels: tuple[str, ...] = ("acme",)) -> Path:
    """A model logged with MLmodel's Python 3.11.7 and these conda.yaml dependencies."""
    conda = {
        "channels": list(channels),
        "dependencies": [*dependencies, "pip", {"pip": ["mlflow==3.17.2", "six==1.17.0"]}],
    }
    return write_model(
        tmp_path / "model",
        json.loads(json.dumps(PYFUNC_SKLEARN)),
        {"conda.yaml": yaml.safe_dump(conda), "requirements.txt": "mlflow==3.17.2\nsix==1.17.0\n"},
    )


def lock_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["lock", *args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, json.loads(out), err


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lock_solves_conda_packages_and_locks_pip_for_their_python(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conda_model(tmp_path, "python=3.12", "acme-tool", "acme-py")
    lock_path, conda_lock_path = tmp_path / "model.lock", tmp_path / "conda-lock.yml"
    code, out, err = lock_json(
        capsys,
        str(model),
        "--conda-channel",
        channel.as_uri(),
        "-o",
        str(lock_path),
        "--conda-lock",
        str(conda_lock_path),
    )
    assert code == 0, err
    conda = out["conda"]
    assert conda["platform"] == "linux-64"
    by_name = {p["name"]: p for p in conda["packages"]}
    # acme-tool's libacme >=1 picks 1.0 over 0.9; python=3.12 picks the 3.12 build.
    assert {n: p["version"] for n, p in by_name.items()} == {
        "acme-py": "0.1",
        "acme-tool": "2.0",
        "libacme": "1.0",
        "python": "3.12.4",
    }
    for package in by_name.values():
        file = channel / package["subdir"] / package["url"].rsplit("/", 1)[1]
        assert package["url"] == file.as_uri()
        assert package["sha256"] == sha256_of(file)
    # The conda environment's Python decides the pip part's, not MLmodel's 3.11.7.
    assert out["target"]["python"] == "3.12"
    assert out["target"]["python_full"] == "3.12.4"
    assert {p["name"] for p in out["packages"]} >= {"mlflow", "six"}

    # One file holds both parts, and reads back the same; its digest covers the conda part.
    locked = read_lock(lock_path)
    assert locked.render() == lock_path.read_text()
    assert locked.digest == out["digest"]
    assert locked.conda is not None
    assert [p.name for p in locked.conda.packages] == sorted(by_name)
    # pip reads the lock file as a requirements file: the conda part is comments to it.
    assert all(
        line.startswith("#") for line in lock_path.read_text().splitlines() if "conda" in line
    )

    # The conda part is a conda-lock file that conda-lock's own parser reads.
    from conda_lock.lockfile import parse_conda_lock_file  # type: ignore[import-untyped]

    parsed = parse_conda_lock_file(conda_lock_path)
    assert parsed.metadata.platforms == ["linux-64"]
    assert {(p.name, p.version, p.hash.sha256) for p in parsed.package} == {
        (n, p["version"], p["sha256"]) for n, p in by_name.items()
    }
    assert all(p.manager == "conda" and p.url.startswith("file://") for p in parsed.package)

    # --lock FILE: the kept lock is verified (both parts) and used as is.
    code, again, err = lock_json(capsys, str(model), "--lock", str(lock_path))
    assert code == 0, err
    assert again["digest"] == out["digest"]


def test_lock_refuses_a_kept_lock_whose_conda_part_misses_a_package(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = conda_model(tmp_path / "a", "acme-tool")
    lock_path = tmp_path / "model.lock"
    code, _, err = lock_json(
        capsys, str(first), "--conda-channel", channel.as_uri(), "-o", str(lock_path)
    )
    assert code == 0, err
    second = conda_model(tmp_path / "b", "acme-tool", "acme-py")
    code, out, _ = lock_json(capsys, str(second), "--lock", str(lock_path))
    assert code == 12
    assert "acme-py (acme-py) is not in the lock's conda part" in out["error"]["message"]


def test_unsatisfiable_conda_spec_names_the_conflicting_packages(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conda_model(tmp_path, "acme-tool", "libacme <1")
    code, out, _ = lock_json(capsys, str(model), "--conda-channel", channel.as_uri())
    assert code == 15
    message = out["error"]["message"]
    assert message.startswith("the conda packages cannot be solved together for linux-64")
    assert "acme-tool" in message
    assert "libacme <1" in message
    assert "conflicting" in out["error"]["hint"]


def test_package_without_a_build_for_the_platform_names_both(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conda_model(tmp_path, "acme-tool", "acme-py")
    code, out, _ = lock_json(
        capsys, str(model), "--conda-channel", channel.as_uri(), "--platform", "linux/arm64"
    )
    assert code == 15
    assert out["error"]["message"] == (
        f"acme-tool has no build for linux-aarch64 (nor noarch) in {channel.as_uri()}; it "
        "has builds for linux-64"
    )
    assert "--platform" in out["error"]["hint"]


def test_channel_with_basic_auth(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_channel(channel) as server:
        model = conda_model(tmp_path, "acme-tool", channels=(server.url,))
        # The file's channel, no credentials: refused, the channel named, the flag to pass.
        code, out, err = lock_json(capsys, str(model))
        assert code == 22
        assert out["error"]["message"].startswith(
            f"the conda channel {server.url} refused packager (401)"
        )
        assert "--conda-channel URL" in out["error"]["hint"]
        # Credentials through --conda-channel: solved; none of them in the lock or output.
        lock_path = tmp_path / "model.lock"
        code, out, err = lock_json(
            capsys,
            str(model),
            "--conda-channel",
            server.url_with_credentials,
            "-o",
            str(lock_path),
        )
        assert code == 0, err
        assert any(ok for _, ok in server.requests)
    text = lock_path.read_text()
    assert server.password not in text + json.dumps(out) + err
    assert server.username not in text
    assert f"- url: {server.url}" in text  # the channel, recorded without credentials
    assert {p["url"] for p in out["conda"]["packages"]} == {
        f"{server.url}/linux-64/acme-tool-2.0-0.conda",
        f"{server.url}/linux-64/libacme-1.0-0.conda",
    }


def test_unreachable_channel_is_named_without_credentials(
    tmp_path: Path, cache_dir: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_channel(channel) as server:
        port = server.port
    # Nothing listens there any more.
    model = conda_model(tmp_path, "acme-tool")
    code, out, err = lock_json(
        capsys,
        str(model),
        "--conda-channel",
        f"http://someone:t0ps3cret-value@127.0.0.1:{port}/acme",
    )
    assert code == 15
    assert out["error"]["message"].startswith(
        f"the conda channel http://127.0.0.1:{port}/acme could not be reached"
    )
    assert "t0ps3cret-value" not in json.dumps(out) + err
    assert "--conda-channel URL" in out["error"]["hint"]


def test_ignore_conda_locks_only_the_pip_part(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No channel at all: --ignore-conda must not even look for one.
    model = conda_model(tmp_path, "python=3.12", "acme-tool", channels=("http://127.0.0.1:9/none",))
    code, out, err = lock_json(capsys, str(model), "--ignore-conda")
    assert code == 0, err
    assert out["conda"] is None
    assert out["target"]["python_full"] == "3.11.7"  # MLmodel's, as before conda
    assert "conda-lock" not in json.dumps(out)


def test_conda_packages_are_cached_by_sha256_and_shared(
    tmp_path: Path, channel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    with serve_channel(channel) as server:
        channels = (server.url_with_credentials,)
        tool = solve_conda(
            CondaEnv(channels=(), python=None, conda_packages=("acme-tool",), pip=()),
            "linux/amd64",
            channels=channels,
            cache_root=cache,
        )
        first = fetch_conda_packages(tool, channels=channels, cache_root=cache)
        assert first.downloaded == 2
        for file in first.files:
            assert file.path == cache / "conda/pkgs/v1/sha256" / file.sha256 / file.file_name
            assert sha256_of(file.path) == file.sha256
            assert file.sha256 == sha256_of(channel / "linux-64" / file.file_name)
        # Another model that shares libacme downloads only what it adds.
        more = solve_conda(
            CondaEnv(channels=(), python=None, conda_packages=("libacme", "acme-py"), pip=()),
            "linux/amd64",
            channels=channels,
            cache_root=cache,
        )
        before = len(server.requests)
        second = fetch_conda_packages(more, channels=channels, cache_root=cache)
        assert {f.name for f in second.files} == {"libacme", "acme-py", "python"}
        assert second.downloaded == 2
        assert sorted(p for p, _ in server.requests[before:]) == [
            "/acme/linux-64/python-3.12.4-0.conda",
            "/acme/noarch/acme-py-0.1-0.conda",
        ]
        # Without the channel's credentials the download is refused, and says so.
        with pytest.raises(IndexAuthError) as refused:
            fetch_conda_packages(tool, cache_root=tmp_path / "other-cache")
        assert str(refused.value).startswith(f"the conda channel refused {server.url}/linux-64/")
    assert server.password not in capsys.readouterr().err


def test_a_package_that_does_not_match_its_sha256_is_not_cached(
    tmp_path: Path, channel: Path
) -> None:
    cache = tmp_path / "cache"
    locked = solve_conda(
        CondaEnv(channels=(), python=None, conda_packages=("libacme",), pip=()),
        "linux/amd64",
        channels=(channel.as_uri(),),
        cache_root=cache,
    )
    wrong = replace(locked, packages=(replace(locked.packages[0], sha256="0" * 64),))
    with pytest.raises(HashMismatchError, match="is not the lock's 0000"):
        fetch_conda_packages(wrong, cache_root=cache)
    assert not list((cache / "conda/pkgs/v1/sha256").glob("*"))


def test_the_locked_packages_install_for_their_final_prefix(tmp_path: Path, channel: Path) -> None:
    """What an image holds at /opt/conda: the lock read back from text, its packages from
    the sha256 cache, installed by rattler into a staging directory for the final prefix.
    The tool's binary names /opt/conda (its placeholder rewritten in place), and nothing
    in the tree names the build host."""
    cache = tmp_path / "cache"
    solved = solve_conda(
        CondaEnv(channels=(), python="3.12", conda_packages=("acme-tool", "acme-py"), pip=()),
        "linux/amd64",
        channels=(channel.as_uri(),),
        cache_root=cache,
    )
    locked = parse_conda_lock(solved.text)
    files = fetch_conda_packages(locked, cache_root=cache).files
    staging = tmp_path / "staging"
    installed = install_prefix(locked, files, staging, work=tmp_path / "rattler-work")
    assert installed.prefix == "/opt/conda"
    assert installed.python == "3.12"
    assert [p.split("=")[0] for p in installed.packages] == [
        "acme-py",
        "acme-tool",
        "libacme",
        "python",
    ]
    # The binary's prefix placeholder (rattler-build's padded build prefix) now reads
    # /opt/conda; libacme is found through the RUNPATH $ORIGIN/../lib.
    ran = subprocess.run(
        [str(staging / "bin/acme-tool")], capture_output=True, text=True, check=True
    )
    assert ran.stdout == "/opt/conda 45\n"
    # noarch: python lands in the site-packages of the conda environment's Python.
    assert (staging / "lib/python3.12/site-packages/acme_py/__init__.py").is_file()
    metas = {p.name: json.loads(p.read_text()) for p in (staging / "conda-meta").glob("*.json")}
    assert {m["name"] for m in metas.values()} == {"acme-py", "acme-tool", "libacme", "python"}
    tool = metas["acme-tool-2.0-0.json"]
    assert tool["url"] == f"{channel.as_uri()}/linux-64/acme-tool-2.0-0.conda"
    assert tool["channel"] == channel.as_uri()
    assert "extracted_package_dir" not in tool
    assert "source" not in tool["link"]
    assert not (staging / "CACHEDIR.TAG").exists()
    host = str(tmp_path).encode()
    assert [p for p in staging.rglob("*") if p.is_file() and host in p.read_bytes()] == []
    # A staging directory is never reused.
    with pytest.raises(LockError, match="exists already"):
        install_prefix(locked, files, staging, work=tmp_path / "rattler-work")


def test_the_conda_layer_is_the_same_blob_from_any_cache_and_needs_a_real_python(
    tmp_path: Path, channel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """packager.image.condalayer: the installed prefix as one deterministic layer, the
    same bytes from two empty caches, reused without installing once it is stored; a
    ``python`` package that is no interpreter is refused before an image uses it."""
    import tarfile

    from packager.env import condaprefix
    from packager.errors import ImageBuildError
    from packager.image.blobs import BlobStore
    from packager.image.condalayer import conda_part

    def layer_in(cache: Path, python: str | None, packages: tuple[str, ...]) -> Any:
        solved = solve_conda(
            CondaEnv(channels=(), python=python, conda_packages=packages, pip=()),
            "linux/amd64",
            channels=(channel.as_uri(),),
            cache_root=cache,
        )
        files = fetch_conda_packages(solved, cache_root=cache).files
        return conda_part(solved, files, BlobStore(cache / "oci"), epoch=1)

    first = layer_in(tmp_path / "a", None, ("acme-tool",))
    second = layer_in(tmp_path / "b", None, ("acme-tool",))
    assert first.layer.digest == second.layer.digest
    assert first.python is None
    assert first.interpreter is None
    assert first.packages == ("acme-tool=2.0=0", "libacme=1.0=0")
    with tarfile.open(first.layer.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    tool = members["opt/conda/bin/acme-tool"]
    assert (tool.uid, tool.gid, tool.mtime, tool.mode) == (0, 0, 1, 0o755)
    assert "opt/conda/lib/libacme.so" in members

    def no_install(*args: object, **kwargs: object) -> None:
        raise AssertionError("installed again")

    monkeypatch.setattr(condaprefix, "install_prefix", no_install)
    assert layer_in(tmp_path / "a", None, ("acme-tool",)).layer == first.layer
    monkeypatch.undo()

    # The channel's python 3.12.4 is a marker file, not an interpreter.
    with pytest.raises(ImageBuildError, match=r"installs no bin/python3\.12"):
        layer_in(tmp_path / "c", "3.12", ("acme-tool",))
    assert not list((tmp_path / "c" / "oci" / "keys").glob("*.json"))  # nothing stored
