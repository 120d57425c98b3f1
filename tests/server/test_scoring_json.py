"""MLflow's answers are the same text when its ``json.dump`` writes through the C encoder
(packager_server.scoring.answer_json_in_c)."""

from __future__ import annotations

import datetime
import io
import json
import types
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import scoring_server

from packager_server import scoring

PREDICTIONS: list[Any] = [
    np.array([1, 2, 3], dtype=np.int64),
    np.array([0.1, 1e-7, 123456789.123, np.nan, np.inf, -np.inf], dtype=np.float64),
    np.array([0.1, 2.5], dtype=np.float32),
    np.array([[1.5, 2.0], [3.0, -0.0]]),
    np.array([True, False]),
    np.array(["a", "é", "\u2028", '"q"'], dtype=object),
    pd.DataFrame({"a": [1, 2], "b": [0.5, np.nan], "c": ["x", None], "d": [True, False]}),
    pd.DataFrame({"t": pd.to_datetime(["2024-01-01 00:00", "2024-06-30 12:00"])}),
    pd.Series([1.25, 2.5], name="s"),
    {"probs": np.array([[0.25, 0.75]]), "label": np.array(["b"])},
    [{"k": np.float64(1.0), "n": np.int32(3)}, {"k": 2.0, "n": None}],
    [datetime.date(2024, 1, 2), b"bytes", 10**30],
    "a plain string",
    7,
]


def _answers(predictions: list[Any]) -> list[str]:
    out = []
    for raw in predictions:
        stream = io.StringIO()
        scoring_server.predictions_to_json(raw, stream)  # type: ignore[no-untyped-call]
        out.append(stream.getvalue())
    return out


def test_answers_are_the_same_text_through_the_c_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    names = vars(scoring_server)  # the module's globals
    monkeypatch.setitem(names, "json", json)
    before = _answers(PREDICTIONS)
    scoring.answer_json_in_c()
    assert isinstance(names["json"], types.SimpleNamespace)
    assert names["json"].dump is scoring._dump
    assert _answers(PREDICTIONS) == before
    # the rest of json is json's own: MLflow's request parsing is untouched
    assert names["json"].loads is json.loads
    assert names["json"].decoder.JSONDecodeError is json.JSONDecodeError
    scoring.answer_json_in_c()  # a second scorer changes nothing
    assert names["json"].dump is scoring._dump
