"""X-MLflow-Signature: what MLflow signs verifies; forged, stale, future deliveries do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.errors import UsageError
from packager.webhook import signature
from packager.webhook.signature import InvalidDelivery, sign, verify

SECRET = "s3cret-for-tests"
WRONG = "not-the-secret"
NOW = 1_800_000_000
BODY = json.dumps(
    {"entity": "model_version", "action": "created", "timestamp": "t", "data": {"name": "m"}}
).encode()


def headers(delivery_id: str = "0b7c9a4e-1", ts: int = NOW, secret: str = SECRET) -> dict[str, str]:
    return {
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": str(ts),
        "X-MLflow-Signature": sign(secret, delivery_id, str(ts), BODY),
    }


def test_mlflow_own_signature_verifies() -> None:
    # MLflow's signer, not ours: the two must agree byte for byte.
    from mlflow.webhooks.delivery import _generate_hmac_signature

    text = BODY.decode()
    sent = {
        "X-MLflow-Delivery-Id": "4d1f6c1e-2b1d-4a55-9f55-0b8c6c2f1d11",
        "X-MLflow-Timestamp": str(NOW),
        "X-MLflow-Signature": _generate_hmac_signature(
            SECRET, "4d1f6c1e-2b1d-4a55-9f55-0b8c6c2f1d11", str(NOW), text
        ),
    }
    got = verify(sent, BODY, SECRET, now=NOW + 3)
    assert got.delivery_id == "4d1f6c1e-2b1d-4a55-9f55-0b8c6c2f1d11"
    assert got.timestamp == NOW


def test_header_names_are_case_insensitive() -> None:
    lower = {k.lower(): v for k, v in headers().items()}
    assert verify(lower, BODY, SECRET, now=NOW).delivery_id == "0b7c9a4e-1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, b: (h, b + b" "), "does not match"),  # body altered
        (lambda h, b: ({**h, "X-MLflow-Delivery-Id": "other"}, b), "does not match"),
        (lambda h, b: ({**h, "X-MLflow-Timestamp": str(NOW + 1)}, b), "does not match"),
        (lambda h, b: ({**h, **headers("0b7c9a4e-1", NOW, WRONG)}, b), "does not match"),
        (lambda h, b: ({**h, "X-MLflow-Signature": "v2,AAAA"}, b), "unsupported"),
        (lambda h, b: ({**h, "X-MLflow-Signature": "v1,not base64!"}, b), "base64"),
        (lambda h, b: ({k: v for k, v in h.items() if "Signature" not in k}, b), "no X-MLflow"),
        (lambda h, b: ({**h, "X-MLflow-Timestamp": "soon"}, b), "Timestamp"),
        (lambda h, b: ({**h, "X-MLflow-Delivery-Id": ""}, b), "Delivery-Id"),
    ],
)
def test_forged_or_malformed_is_refused(change: object, reason: str) -> None:
    sent, body = change(headers(), BODY)  # type: ignore[operator]
    with pytest.raises(InvalidDelivery, match=reason):
        verify(sent, body, SECRET, now=NOW)


def test_stale_and_future_timestamps_are_refused_at_the_window() -> None:
    assert verify(headers(ts=NOW - 300), BODY, SECRET, now=NOW).timestamp == NOW - 300
    assert verify(headers(ts=NOW + 300), BODY, SECRET, now=NOW).timestamp == NOW + 300
    with pytest.raises(InvalidDelivery, match="301 s old"):
        verify(headers(ts=NOW - 301), BODY, SECRET, now=NOW)
    with pytest.raises(InvalidDelivery, match="future"):
        verify(headers(ts=NOW + 301), BODY, SECRET, now=NOW)


def test_reason_never_holds_secret_signature_or_body() -> None:
    forged = {**headers(), "X-MLflow-Signature": sign(WRONG, "0b7c9a4e-1", str(NOW), BODY)}
    with pytest.raises(InvalidDelivery) as caught:
        verify(forged, BODY, SECRET, now=NOW)
    for leaked in (SECRET, forged["X-MLflow-Signature"], BODY.decode()):
        assert leaked not in caught.value.reason


def test_secret_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    assert signature.load_secret(env="HOOK_SECRET") == SECRET
    (tmp_path / "secret").write_text(SECRET + "\n")
    assert signature.load_secret(file=tmp_path / "secret") == SECRET
    monkeypatch.setenv("EMPTY_SECRET", "")
    with pytest.raises(UsageError, match="EMPTY_SECRET is empty"):
        signature.load_secret(env="EMPTY_SECRET")
    with pytest.raises(UsageError, match="exactly one"):
        signature.load_secret(env="HOOK_SECRET", file=tmp_path / "secret")
    with pytest.raises(UsageError, match="cannot read"):
        signature.load_secret(file=tmp_path / "missing")
