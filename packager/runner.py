"""The one door for subprocesses (uv, pip-compile, pip): log, run, explain failures.

* The command line is logged with credentials stripped; secrets are passed through the
  environment (``secret_env``), never in argv, so they reach neither logs nor ``ps``.
* A missing executable is a :class:`ToolMissingError` naming how to install it.
* A failing command raises :class:`CommandFailedError` with the tail of its output,
  scrubbed of every secret we know of.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.errors import CommandFailedError, ToolMissingError
from packager.redact import redact_uris_in, scrub, secret_parts

log = logging.getLogger(__name__)

_TAIL = 4000


@dataclass(frozen=True)
class Completed:
    stdout: str
    stderr: str
    seconds: float


def find_tool(name: str, *, install_hint: str) -> str:
    """Path of ``name``: next to this interpreter first (our venv), then on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(f"{name} is not installed", hint=install_hint)
    return found


def run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path | None = None,
    secret_env: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
) -> Completed:
    """Run ``argv``; ``what`` names the step in errors ("locking with uv")."""
    # Hide the credentials inside the secret values, not whole URLs: an error must still
    # be able to say which index failed.
    secrets = [part for v in (secret_env or {}).values() for part in secret_parts(v)]
    shown = " ".join(shlex.quote(redact_uris_in(a)) for a in argv)
    log.debug("running: %s", shown)
    full_env = {**os.environ, **(env or {}), **(secret_env or {})}
    started = time.monotonic()
    try:
        result = subprocess.run(
            list(argv),
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise ToolMissingError(f"{what}: {argv[0]} not found") from err
    except subprocess.TimeoutExpired as err:
        raise CommandFailedError(f"{what}: gave up after {timeout:.0f}s", hint=shown) from err
    seconds = time.monotonic() - started
    if result.returncode != 0:
        output = _clean(result.stderr or result.stdout, secrets)
        raise CommandFailedError(
            f"{what} failed (exit {result.returncode}):\n{output[-_TAIL:]}",
            hint=f"the command was: {_clean(shown, secrets)}",
            output=output,
        )
    return Completed(
        stdout=_clean(result.stdout, secrets),
        stderr=_clean(result.stderr, secrets),
        seconds=seconds,
    )


def _clean(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return redact_uris_in(scrub(text))
