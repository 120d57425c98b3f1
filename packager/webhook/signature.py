"""Verify MLflow's webhook signature, the way MLflow makes it.

MLflow (``mlflow/webhooks/delivery.py``) signs ``f"{delivery_id}.{timestamp}.{body}"``
with HMAC-SHA256 under the webhook's secret and sends ``v1,<base64 digest>`` in
``X-MLflow-Signature``, the id in ``X-MLflow-Delivery-Id`` and unix seconds in
``X-MLflow-Timestamp``. Its own retries resend the same three headers, so a repeated id is
a retry or a replay: the queue answers it without queueing again (see :mod:`.queue`); this
module only says whether the delivery is authentic and fresh.

The secret comes from an environment variable or a file, never a flag (a flag shows in
``ps`` and shell history), and is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packager.errors import UsageError

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
VERSION = "v1"
# MLflow's docs advise refusing deliveries older than about five minutes; a timestamp as
# far in the future is refused too (a forged or badly clocked sender).
WINDOW_SECONDS = 300
# MLflow sends a UUID; anything printable and short is accepted, since it is only a key.
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class InvalidDelivery(Exception):  # noqa: N818 — the receiver's reason to answer 401
    """The delivery is unsigned, forged or outside the time window. ``reason`` is safe
    to log: it never holds the body, the secret or the signature."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """The authenticated headers of one delivery."""

    delivery_id: str
    timestamp: int


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow would send (for tests and ``webhook test``)."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    *,
    now: float | None = None,
    window: int = WINDOW_SECONDS,
) -> Delivery:
    """The delivery's id and timestamp, once its signature and age check out.

    ``headers`` is looked up case-insensitively (HTTP header names are). The body is
    checked as received, byte for byte: MLflow signs the JSON text it sends.
    """
    delivery_id, timestamp, signature = check_headers(headers)
    _check_signature(signature, sign(secret, delivery_id, timestamp, body))
    age = (time.time() if now is None else now) - int(timestamp)
    if age > window:
        raise InvalidDelivery(f"the delivery is {int(age)} s old, older than {window} s")
    if age < -window:
        raise InvalidDelivery(f"the delivery is dated {int(-age)} s in the future")
    return Delivery(delivery_id=delivery_id, timestamp=int(timestamp))


def check_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    """The delivery id, timestamp and signature headers, once each is present and well
    formed (before the body is read: a request without them is refused unread)."""
    lower = {key.lower(): value for key, value in headers.items()}
    delivery_id = lower.get(DELIVERY_ID_HEADER.lower(), "")
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    signature = lower.get(SIGNATURE_HEADER.lower(), "")
    if not signature:
        raise InvalidDelivery("no X-MLflow-Signature header (is the webhook's secret set?)")
    if not _DELIVERY_ID.fullmatch(delivery_id):
        raise InvalidDelivery("missing or malformed X-MLflow-Delivery-Id")
    # ASCII digits only: str.isdigit() accepts "²", which int() then refuses.
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        raise InvalidDelivery("missing or malformed X-MLflow-Timestamp")
    if len(signature) > 256:
        raise InvalidDelivery("malformed X-MLflow-Signature (too long)")
    return delivery_id, timestamp, signature


def _check_signature(received: str, expected: str) -> None:
    """Constant-time comparison of the decoded digests. The signature is checked before
    the timestamp so that an unauthenticated sender learns nothing about the window."""
    version, _, encoded = received.partition(",")
    if version != VERSION:
        raise InvalidDelivery(f"unsupported signature version {version[:8]!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidDelivery("the signature is not valid base64") from None
    wanted = base64.b64decode(expected.partition(",")[2])
    if not hmac.compare_digest(digest, wanted):
        raise InvalidDelivery("the signature does not match (wrong secret, or a forged body)")


def load_secret(*, env: str | None = None, file: Path | None = None) -> str:
    """The shared secret from ``env`` (a variable's name) or ``file`` (trailing newline
    dropped); exactly one of the two."""
    if (env is None) == (file is None):
        raise UsageError(
            "the webhook secret needs exactly one source",
            hint="pass --secret-env VAR or --secret-file PATH (never the secret itself)",
        )
    if file is None:
        secret = os.environ.get(str(env), "")
        where = f"environment variable {env}"
    else:
        try:
            secret = file.read_text().rstrip("\r\n")
        except OSError as err:
            raise UsageError(f"cannot read the webhook secret file {file}: {err.strerror}") from err
        where = f"file {file}"
    if not secret:
        raise UsageError(
            f"the webhook secret from {where} is empty",
            hint="set the same secret as the MLflow webhook's (`packager webhook register`)",
        )
    return secret
