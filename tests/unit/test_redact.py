from __future__ import annotations

import logging

import pytest

from packager.redact import SecretFilter, redact_uri, scrub, secret_values


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://user:pa55word@mlflow.example.com/api", "https://mlflow.example.com/api"),
        ("https://token@host:8443/simple", "https://host:8443/simple"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        (
            "s3://bucket/key?X-Amz-Signature=abc&X-Amz-Date=1&part=2",
            "s3://bucket/key?X-Amz-Signature=***&X-Amz-Date=***&part=2",
        ),
        ("https://h/p?token=abc&other=1", "https://h/p?token=***&other=1"),
        ("databricks", "databricks"),
        ("/local/path/model", "/local/path/model"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        (
            "https://conda.anaconda.org/t/tk-123456/private",
            "https://conda.anaconda.org/t/***/private",
        ),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_secret_values_come_from_secret_named_variables() -> None:
    env = {
        "MLFLOW_TRACKING_TOKEN": "dapi-0123456789",
        "MLFLOW_TRACKING_PASSWORD": "hunter2hunter2",
        "PIP_EXTRA_INDEX_URL": "https://ci-user:index-s3cret@pkgs.example.com/simple",
        "HOME": "/root",
        "SHORT_TOKEN": "abc",  # too short to redact safely
    }
    values = secret_values(env)
    assert "dapi-0123456789" in values
    assert "hunter2hunter2" in values
    assert "index-s3cret" in values
    assert "ci-user" in values
    assert "/root" not in values
    assert "abc" not in values


def test_scrub_removes_env_secrets_and_userinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "dapi-0123456789")
    text = "401 for token dapi-0123456789 at https://bob:pw123456@host/x"
    cleaned = scrub(text)
    assert "dapi-0123456789" not in cleaned
    assert "pw123456" not in cleaned
    assert "https://***@host/x" in cleaned


def test_secret_filter_scrubs_log_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "dapi-0123456789")
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "token=%s", ("dapi-0123456789",), None
    )
    assert SecretFilter().filter(record)
    assert record.getMessage() == "token=***"
