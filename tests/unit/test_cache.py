from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from packager.cache import ModelCache
from packager.errors import CacheError


def _fill(content: str) -> object:
    def fill(dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "MLmodel").write_text(content)
        (dest / "sub").mkdir()
        (dest / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)

    return fill


def test_store_then_lookup(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    stored = cache.store("id-1", _fill("flavors: {}"))  # type: ignore[arg-type]
    assert not stored.reused
    assert stored.digest.startswith("sha256:")
    assert (stored.path / "sub" / "weights.bin").stat().st_size == 1000
    found = cache.lookup("id-1")
    assert found is not None
    assert (found.path, found.digest, found.reused) == (stored.path, stored.digest, True)
    assert cache.lookup("id-2") is None
    # Same content under another identity shares the object.
    other = cache.store("id-2", _fill("flavors: {}"))  # type: ignore[arg-type]
    assert other.path == stored.path
    assert list((cache.root / "tmp").iterdir()) == []


def test_failed_download_publishes_nothing(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)

    def broken(dest: Path) -> None:
        dest.mkdir(parents=True)
        (dest / "MLmodel").write_text("half")
        raise ConnectionError("network dropped")

    with pytest.raises(ConnectionError):
        cache.store("id", broken)
    assert cache.lookup("id") is None
    assert not (cache.root / "objects").exists() or not any((cache.root / "objects").iterdir())
    assert list((cache.root / "tmp").iterdir()) == []


def test_damaged_object_is_not_trusted(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    stored = cache.store("id", _fill("x"))  # type: ignore[arg-type]
    (stored.path / "sub" / "weights.bin").write_bytes(b"\x01" * 10)  # truncated
    assert cache.lookup("id") is None
    again = cache.store("id", _fill("x"))  # type: ignore[arg-type]
    assert (again.path / "sub" / "weights.bin").stat().st_size == 1000
    assert cache.lookup("id") is not None


def test_killed_download_is_never_trusted(tmp_path: Path) -> None:
    """SIGKILL in the middle of a download: the next run downloads again and succeeds."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from packager.cache import ModelCache
        def fill(dest):
            dest.mkdir(parents=True)
            (dest / "MLmodel").write_text("partial")
            print("writing", flush=True)
            time.sleep(60)
        ModelCache(Path({str(tmp_path)!r})).store("id", fill)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    cache = ModelCache(tmp_path)
    assert cache.lookup("id") is None
    stored = cache.store("id", _fill("complete"))  # type: ignore[arg-type]
    assert (stored.path / "MLmodel").read_text() == "complete"


def test_stale_temporary_directories_are_removed(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    stale = cache.root / "tmp" / "dl-old"
    stale.mkdir(parents=True)
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    cache.store("id", _fill("x"))  # type: ignore[arg-type]
    assert not stale.exists()


def test_unwritable_cache_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(CacheError, match="PACKAGER_CACHE_DIR"):
        ModelCache(blocker).store("id", _fill("x"))  # type: ignore[arg-type]
