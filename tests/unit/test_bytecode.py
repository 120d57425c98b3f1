"""Bytecode for the venv (wheelinstall) and unpacking a base's root file system (rootfs)."""

from __future__ import annotations

import io
import marshal
import sys
import tarfile
from pathlib import Path

import pytest

from packager.image import rootfs, wheelinstall


def _site(root: Path) -> Path:
    site = root / "opt" / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = {'b', 'a', 'c'}\n")
    (site / "pkg" / "tests" / "test_pkg.py").write_text("def test(): pass\n")
    (site / "broken.py").write_text("def (:\n")
    (site / "single.py").write_text("import os\n")
    return site


def _pycs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.pyc"))}


def test_compile_writes_unchecked_hash_pycs_with_the_final_path(tmp_path: Path) -> None:
    site = _site(tmp_path / "stage")
    failed = wheelinstall.compile_tree(
        sorted(site.iterdir()), strip=str(tmp_path / "stage"), prepend="/"
    )
    assert failed == 1  # broken.py, left without bytecode as pip does
    pyc = site / "pkg" / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    data = pyc.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 1  # hash-based, not checked at import
    code = marshal.loads(data[16:])  # noqa: S302 - a file this test just wrote
    assert code.co_filename == "/opt/venv/lib/python3.11/site-packages/pkg/__init__.py"
    assert (site / "__pycache__").is_dir()  # single.py
    assert not list((site / "pkg" / "tests").rglob("*.pyc"))  # tests are never imported
    assert not list(site.rglob("broken*.pyc"))


def test_parallel_groups_give_the_same_bytes(tmp_path: Path) -> None:
    one = _site(tmp_path / "one")
    two = _site(tmp_path / "two")
    wheelinstall.compile_tree(sorted(one.iterdir()), strip=str(tmp_path / "one"), prepend="/")
    wheelinstall.compile_in_parallel(
        sorted(two.iterdir()),
        [sys.executable, wheelinstall.__file__],
        jobs=3,
        strip=str(tmp_path / "two"),
        prepend="/",
    )
    assert _pycs(tmp_path / "one") == _pycs(tmp_path / "two")
    assert len(_pycs(tmp_path / "one")) == 2


def test_prune_tests_removes_only_tests_directories_inside_packages(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    kept = [
        "pkg/__init__.py",
        "pkg/tests.py",  # a module, not a directory (jinja2.tests)
        "pkg/test/__init__.py",  # often public API (graphene.test)
        "pkg/testing/__init__.py",  # numpy.testing
        "tests/__init__.py",  # a top-level package is left alone
        "other/sub/nottests/x.py",
    ]
    removed = ["pkg/tests/test_a.py", "pkg/tests/data/blob.bin", "other/sub/tests/test_b.py"]
    for name in kept + removed:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("x = 1\n")
    outside = tmp_path / "outside"
    (outside / "tests").mkdir(parents=True)
    (outside / "tests" / "keep.py").write_text("")
    (site / "linked").symlink_to(outside)  # never followed
    (site / "pkg" / "sub").mkdir()
    (site / "pkg" / "sub" / "tests").symlink_to(outside / "tests")  # not a real directory

    assert wheelinstall.prune_tests(site) == (2, 3 * len("x = 1\n"))

    assert all((site / name).is_file() for name in kept)
    assert not any((site / name).exists() for name in removed)
    assert (outside / "tests" / "keep.py").is_file()
    assert (site / "pkg" / "sub" / "tests").is_symlink()


def _layer(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _node(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.mode = 0o755
    return info, None


def test_layers_apply_with_whiteouts_and_nothing_escapes(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    lower = _layer(
        tmp_path / "lower.tar",
        [
            _node("a", tarfile.DIRTYPE),
            _file("a/gone", b"1"),
            _file("a/kept", b"2"),
            _node("d", tarfile.DIRTYPE),
            _file("d/old", b"3"),
            _node("escape", tarfile.SYMTYPE, str(outside)),
            _node("relative", tarfile.SYMTYPE, "a"),
        ],
    )
    upper = _layer(
        tmp_path / "upper.tar",
        [
            _file("a/.wh.gone", b""),
            _file("d/.wh..wh..opq", b""),
            _file("d/new", b"4"),
            _file("escape/secret", b"overwritten"),  # through an absolute link: refused
            _file("escape/.wh.secret", b""),  # a whiteout through it: ignored
            _file("../up", b"5"),
            _node("dev/null", tarfile.CHRTYPE),
        ],
    )
    root = tmp_path / "root"
    root.mkdir()
    assert rootfs.apply_layer(lower, root) == 0
    skipped = rootfs.apply_layer(upper, root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "a/kept",
        "d/new",
    ]
    assert (outside / "secret").read_text() == "host file"
    assert not (tmp_path / "up").exists()
    assert skipped == 3  # ../up, the write through the link, the device
    assert (root / "relative").is_symlink()


def test_a_root_without_the_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    from packager.errors import ImageBuildError

    with pytest.raises(ImageBuildError, match=r"writing bytecode: the base image has no"):
        rootfs.interpreter_command(tmp_path, "/usr/bin/python3.11", what="writing bytecode")


def test_links_resolve_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("/usr/lib")  # absolute: starts at the root, not the host's
    (tmp_path / "usr" / "lib" / "up").symlink_to("../../../../../../etc")
    assert rootfs.resolve_inside(tmp_path, "/lib/x") == tmp_path / "usr" / "lib" / "x"
    assert rootfs.resolve_inside(tmp_path, "/usr/lib/up/passwd") == tmp_path / "etc" / "passwd"
    (tmp_path / "loop").symlink_to("/loop")
    from packager.errors import ImageBuildError

    with pytest.raises(ImageBuildError, match="too many symbolic links"):
        rootfs.resolve_inside(tmp_path, "/loop/x")


HOST_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


@pytest.mark.skipif(
    sys.platform != "linux" or not HOST_PYTHON.is_file(),
    reason="needs a Debian-style /usr/bin/pythonX.Y of this Python's version",
)
def test_the_loader_runs_a_root_s_python_with_no_namespace(tmp_path: Path) -> None:
    """The machine's own / as the "base": the loader-run interpreter writes the same bytes
    as the same interpreter started normally."""
    interpreter = str(HOST_PYTHON)
    command = rootfs.interpreter_command(Path("/"), interpreter, what="writing bytecode")
    assert command[1] == "--library-path"
    assert rootfs.elf_interpreter(HOST_PYTHON) is not None
    one, two = _site(tmp_path / "one"), _site(tmp_path / "two")
    wheelinstall.compile_in_parallel(
        sorted(one.iterdir()),
        [*command, wheelinstall.__file__],
        jobs=2,
        strip=str(tmp_path / "one"),
        prepend="/",
        env=rootfs.interpreter_environment(Path("/"), interpreter),
    )
    wheelinstall.compile_in_parallel(
        sorted(two.iterdir()),
        [interpreter, wheelinstall.__file__],
        jobs=1,
        strip=str(tmp_path / "two"),
        prepend="/",
        env=dict(rootfs.ENVIRONMENT),
    )
    assert _pycs(tmp_path / "one") == _pycs(tmp_path / "two")
    assert len(_pycs(tmp_path / "one")) == 2
