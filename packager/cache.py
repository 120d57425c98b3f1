"""A content-addressed cache of downloaded models.

Layout under the cache root (``PACKAGER_CACHE_DIR``, else the user cache directory)::

    models/v1/objects/<hex>/model/          the model files, as downloaded
    models/v1/objects/<hex>/manifest.json   every file's path, size and sha256
    models/v1/refs/<sha256(identity)>.json  which object a resolved identity points to
    models/v1/tmp/<random>/                 downloads in progress

Atomicity: a download is written under ``tmp/``, hashed, and then renamed into
``objects/`` in one ``rename``; a ref is written to a temporary file and ``os.replace``-d.
A killed download leaves only a ``tmp/`` directory, which nothing ever reads (and which a
later run removes once it is stale). Two concurrent downloads of the same model both
succeed; the second rename finds the object present and discards its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

from packager.digest import FileEntry, manifest, tree_digest
from packager.errors import CacheError

log = logging.getLogger(__name__)

_LAYOUT = Path("models") / "v1"
_STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True, kw_only=True)
class CachedModel:
    """A complete model in the cache."""

    path: Path  # the model directory
    digest: str  # "sha256:<hex>" tree digest
    files: tuple[FileEntry, ...]
    reused: bool


def default_cache_root() -> Path:
    configured = os.environ.get("PACKAGER_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir("packager"))


class ModelCache:
    """Downloaded models keyed by content, looked up by resolved identity."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_root()) / _LAYOUT

    # -- lookup -----------------------------------------------------------------------

    def lookup(self, identity: str) -> CachedModel | None:
        """The cached model for ``identity``, or None if absent or damaged."""
        ref = self._ref_path(identity)
        try:
            data = json.loads(ref.read_text())
            hex_digest = str(data["digest"]).removeprefix("sha256:")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable cache ref %s (%s)", ref, err)
            return None
        obj = self.root / "objects" / hex_digest
        files = self._read_manifest(obj)
        if files is None or not self._intact(obj / "model", files):
            log.warning("cached model %s is damaged; downloading it again", obj)
            self._discard(obj)
            return None
        return CachedModel(
            path=obj / "model", digest=f"sha256:{hex_digest}", files=files, reused=True
        )

    # -- immutable references -----------------------------------------------------------

    def remember(self, reference_key: str, identity: str, record: dict[str, object]) -> None:
        """Note that an immutable reference resolves to ``identity`` (with ``record``)."""
        path = self._ref_path("reference|" + reference_key)
        try:
            self._ensure_dir(path.parent)
            self._write_json(path, {"identity": identity, "record": record})
        except OSError as err:
            log.warning("could not remember %s in the cache: %s", reference_key, err)

    def recall(self, reference_key: str) -> tuple[CachedModel, dict[str, object]] | None:
        """The cached model and record of an immutable reference seen before, if intact."""
        path = self._ref_path("reference|" + reference_key)
        try:
            data = json.loads(path.read_text())
            identity, record = str(data["identity"]), dict(data["record"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        cached = self.lookup(identity)
        return (cached, record) if cached is not None else None

    # -- store ------------------------------------------------------------------------

    def store(self, identity: str, fill: Callable[[Path], None]) -> CachedModel:
        """Run ``fill(directory)`` to download a model, then publish it atomically.

        If ``fill`` raises (or the process dies), nothing under ``objects/`` or ``refs/``
        changes.
        """
        tmp_root = self._ensure_dir(self.root / "tmp")
        self._clean_stale(tmp_root)
        work = Path(tempfile.mkdtemp(prefix="dl-", dir=tmp_root))
        try:
            fill(work / "model")  # its errors are the caller's (download, registry)
            try:
                files, digest, target = self._publish(work)
            except OSError as err:
                raise CacheError(
                    f"could not write the model cache under {self.root}: {err}",
                    hint="check free disk space and permissions, or set PACKAGER_CACHE_DIR",
                ) from err
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        self._write_ref(identity, digest)
        return CachedModel(path=target / "model", digest=digest, files=files, reused=False)

    # -- helpers ----------------------------------------------------------------------

    def _publish(self, work: Path) -> tuple[tuple[FileEntry, ...], str, Path]:
        """Hash ``work/model``, write its manifest, and rename it into ``objects/``."""
        files = manifest(work / "model")
        digest = tree_digest(files)
        hex_digest = digest.removeprefix("sha256:")
        self._write_json(
            work / "manifest.json", {"digest": digest, "files": [asdict(f) for f in files]}
        )
        target = self._ensure_dir(self.root / "objects") / hex_digest
        if target.exists():
            log.debug("object %s already cached by another run", hex_digest)
            return files, digest, target
        try:
            work.rename(target)
        except OSError:
            if not target.exists():  # not a lost race with a concurrent run: a real failure
                raise
        return files, digest, target

    def _ref_path(self, identity: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(identity.encode()).hexdigest() + ".json")

    def _write_ref(self, identity: str, digest: str) -> None:
        ref = self._ref_path(identity)
        try:
            self._ensure_dir(ref.parent)
            self._write_json(ref, {"identity": identity, "digest": digest})
        except OSError as err:
            raise CacheError(
                f"could not record the cache entry {ref}: {err}",
                hint="check permissions on the cache directory or set PACKAGER_CACHE_DIR",
            ) from err

    @staticmethod
    def _write_json(path: Path, data: object) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            Path(tmp).replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise

    @staticmethod
    def _read_manifest(obj: Path) -> tuple[FileEntry, ...] | None:
        try:
            data = json.loads((obj / "manifest.json").read_text())
            return tuple(FileEntry(**entry) for entry in data["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _intact(model_dir: Path, files: tuple[FileEntry, ...]) -> bool:
        # Sizes, not hashes: cheap enough for every lookup, and catches truncation and
        # deleted files. A full re-hash is what `store` does on the way in.
        # A file must also still be inside the object: a link planted in the cache must not
        # take a build outside it (walk_files applies the same rule on the way in).
        top = os.path.realpath(model_dir) + os.sep
        for entry in files:
            path = model_dir / entry.path
            try:
                if path.stat().st_size != entry.size or not os.path.realpath(path).startswith(top):
                    return False
            except OSError:
                return False
        return True

    def _ensure_dir(self, path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"cannot create cache directory {path}: {err}",
                hint="set PACKAGER_CACHE_DIR to a writable directory",
            ) from err
        return path

    @staticmethod
    def _discard(obj: Path) -> None:
        # Move aside first so a concurrent reader never sees a half-deleted object.
        trash = obj.with_name(obj.name + f".trash-{os.getpid()}")
        with contextlib.suppress(OSError):
            obj.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _clean_stale(tmp_root: Path) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in tmp_root.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
