"""Every failure packager reports on purpose, one class each, with its exit code.

A message says what happened; ``hint`` says the likely cause and the next step. The CLI
prints both and exits with ``exit_code``; a traceback appears only with ``--debug``.
Library callers catch :class:`PackagerError` (or a subclass) and decide for themselves.

Exit codes (also documented in the README):

====  ================================  ==============================================
code  class                             meaning
====  ================================  ==============================================
1     (any other exception)             a bug in packager: please report it
2     UsageError                        the command line or a model reference is malformed
3     ModelNotFoundError                the model, version, alias, stage or run does not exist
4     RegistryUnreachableError          the tracking/registry server could not be reached
5     ModelFormatError                  MLmodel or an environment file is missing or malformed
6     NotServableError                  the model has no python_function flavor
7     DownloadError                     downloading the model's artifacts failed
8     RegistryAuthError                 the server refused our credentials
9     CacheError                        the local cache could not be read or written
10    ToolMissingError                  an external tool (uv, pip-compile) is not installed
11    CommandFailedError                an external tool failed
12    LockError                         a lock is malformed, for another target, or unsatisfying
13    MissingWheelError                 a required wheel file cannot be found
14    UnsupportedRequirementError       a requirement cannot be locked by hash (source trees)
15    ResolutionError                   the requirements conflict, or an index failed
16    HashMismatchError                 a download does not match the lock's hashes
17    NoWheelError                      a package has no wheel for the image's platform
18    DockerUnavailableError            the Docker engine cannot be reached
19    ImageBuildError                   the engine failed to build (or import) an image
20    ImageTestError                    the image does not serve its model correctly
21    PushError                         the registry refused the image or did not confirm it
22    IndexAuthError                    a package index refused us: credentials missing or wrong
130   (Ctrl-C)                          interrupted; nothing half-written is kept
====  ================================  ==============================================
"""

from __future__ import annotations

from typing import ClassVar


class PackagerError(Exception):
    """Base class: a failure packager understands and can explain."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(PackagerError):
    """The user's input (flags, model reference) cannot be understood."""

    exit_code = 2


class ModelNotFoundError(PackagerError):
    """The reference is well-formed but names nothing that exists."""

    exit_code = 3


class RegistryUnreachableError(PackagerError):
    """No answer from the tracking/registry server (connection refused, DNS, timeout)."""

    exit_code = 4


class ModelFormatError(PackagerError):
    """A model directory is not a valid MLflow model (MLmodel or env files broken)."""

    exit_code = 5


class NotServableError(PackagerError):
    """The model cannot be loaded by a pyfunc server."""

    exit_code = 6


class DownloadError(PackagerError):
    """The model's artifacts could not be downloaded completely."""

    exit_code = 7


class RegistryAuthError(PackagerError):
    """The server answered 401/403."""

    exit_code = 8


class CacheError(PackagerError):
    """The cache directory is unusable (permissions, disk full, corrupted entry)."""

    exit_code = 9


class ToolMissingError(PackagerError):
    """An external tool packager drives is not installed."""

    exit_code = 10


class CommandFailedError(PackagerError):
    """An external tool exited with an error."""

    exit_code = 11

    def __init__(self, message: str, *, hint: str | None = None, output: str = "") -> None:
        super().__init__(message, hint=hint)
        self.output = output  # the tool's scrubbed output, for callers that interpret it


class LockError(PackagerError):
    """A lock is malformed, for another target, or doesn't satisfy the model."""

    exit_code = 12


class MissingWheelError(PackagerError):
    """A requirement names a wheel file that can't be found."""

    exit_code = 13


class UnsupportedRequirementError(PackagerError):
    """A requirement line packager can't turn into a reproducible install."""

    exit_code = 14


class ResolutionError(PackagerError):
    """The requirements cannot be satisfied together, or an index failed."""

    exit_code = 15


class HashMismatchError(PackagerError):
    """A downloaded file's sha256 is not one the lock allows."""

    exit_code = 16


class NoWheelError(PackagerError):
    """A locked package has no wheel for the image's platform."""

    exit_code = 17


class DockerUnavailableError(PackagerError):
    """The Docker engine cannot be reached."""

    exit_code = 18


class ImageBuildError(PackagerError):
    """The engine failed to build (or import) an image."""

    exit_code = 19


class ImageTestError(PackagerError):
    """The image does not serve its model correctly."""

    exit_code = 20


class PushError(PackagerError):
    """The registry refused the image, or did not confirm it with a digest."""

    exit_code = 21


class IndexAuthError(PackagerError):
    """A package index refused packager (401/403): its credentials are missing or wrong."""

    exit_code = 22


class ImageNotFoundError(PackagerError):
    """The image is not in the engine, or its reference is not valid."""

    exit_code = 23


class ForeignImageError(PackagerError):
    """The image was not built by packager (it has no packager labels)."""

    exit_code = 24


class RecordError(PackagerError):
    """The model registry refused to record a release (the image was pushed already)."""

    exit_code = 25


class RebuildError(PackagerError):
    """``packager rebuild``: the image's provenance cannot be followed (missing,
    unreadable, or an input that is no longer what it names)."""

    exit_code = 26


ALL_ERRORS: tuple[type[PackagerError], ...] = (
    UsageError,
    ModelNotFoundError,
    RegistryUnreachableError,
    ModelFormatError,
    NotServableError,
    DownloadError,
    RegistryAuthError,
    CacheError,
    ToolMissingError,
    CommandFailedError,
    LockError,
    MissingWheelError,
    UnsupportedRequirementError,
    ResolutionError,
    HashMismatchError,
    NoWheelError,
    DockerUnavailableError,
    ImageBuildError,
    ImageTestError,
    PushError,
    IndexAuthError,
    ImageNotFoundError,
    ForeignImageError,
    RecordError,
    RebuildError,
)
