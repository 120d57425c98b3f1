"""Keep credentials out of everything packager writes: provenance, logs, errors, images.

Two mechanisms, because secrets arrive two ways:

* inside URIs (``https://user:token@host``, ``?token=...`` or pre-signed ``X-Amz-Signature``
  query strings): :func:`redact_uri` strips them structurally;
* as bare values in the environment (``MLFLOW_TRACKING_TOKEN``, index passwords) that a third
  party library may echo in an exception: :class:`SecretFilter` replaces every known secret
  value in log records, and :func:`scrub` does the same for arbitrary text (error messages).
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Query parameters that carry credentials in the URIs MLflow users pass around (Databricks
# tokens, S3/GCS/Azure pre-signed URLs, generic API keys).
_SECRET_QUERY_KEYS = re.compile(
    r"(token|secret|password|passwd|pwd|key|sig|signature|credential|auth|sas|x-amz-.*)$",
    re.IGNORECASE,
)

# Anaconda-style channel tokens live in the path: https://conda.anaconda.org/t/<token>/chan
_CONDA_TOKEN_PATH = re.compile(r"^/t/[^/]+/")

# Environment variables whose values are secrets wherever they appear.
_SECRET_ENV_NAMES = re.compile(
    r"(TOKEN|PASSWORD|SECRET|ACCESS_KEY|API_KEY|CLIENT_SECRET|CREDENTIALS?)$|^PIP_INDEX_URL$|"
    r"^PIP_EXTRA_INDEX_URL$|^UV_INDEX_URL$|^UV_EXTRA_INDEX_URL$",
)

# Short values would redact ordinary words from every log line.
_MIN_SECRET_LENGTH = 6


def redact_uri(uri: str) -> str:
    """Return ``uri`` without user info and without secret-looking query parameters.

    Non-URL strings (plain paths, ``databricks``) come back unchanged.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    path = _CONDA_TOKEN_PATH.sub("/t/" + REDACTED + "/", parts.path)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_QUERY_KEYS.search(k) for k, _ in pairs)
    if netloc == parts.netloc and path == parts.path and not secret_query:
        return uri  # urlunsplit would normalise e.g. sqlite:///x into sqlite:/x
    query = (
        urlencode(
            [(k, REDACTED if _SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs], safe="*"
        )
        if secret_query
        else parts.query
    )
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_uris_in(text: str) -> str:
    """Apply :func:`redact_uri` to every URL inside free text (a requirement line)."""
    return _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def secret_parts(value: str) -> list[str]:
    """The parts of ``value`` to hide: the user info of the URLs in it, or all of it."""
    urls = [v for v in value.split() if "://" in v]
    if not urls:
        return [value] if len(value) >= _MIN_SECRET_LENGTH else []
    parts = []
    for url in urls:
        userinfo = urlsplit(url).netloc.rpartition("@")[0]
        parts += [p for p in userinfo.split(":") if len(p) >= _MIN_SECRET_LENGTH]
    return parts


def secret_values(environ: os._Environ[str] | dict[str, str] | None = None) -> list[str]:
    """The secret values currently set in the environment, longest first."""
    env = os.environ if environ is None else environ
    values: set[str] = set()
    for name, value in env.items():
        if not value or not _SECRET_ENV_NAMES.search(name.upper()):
            continue
        if len(value) >= _MIN_SECRET_LENGTH:
            values.add(value)
        # Index URLs hide credentials as user info; redact those parts individually too.
        userinfo = urlsplit(value).netloc.rpartition("@")[0] if "://" in value else ""
        for piece in userinfo.split(":"):
            if len(piece) >= _MIN_SECRET_LENGTH:
                values.add(piece)
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """Replace every known secret value and every URI's user info inside ``text``."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return _USERINFO_IN_TEXT.sub(r"\1" + REDACTED + "@", text)


_USERINFO_IN_TEXT = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


class SecretFilter(logging.Filter):
    """A logging filter that scrubs secrets from every record before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True
