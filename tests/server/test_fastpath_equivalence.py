"""The fast path gives exactly MLflow's frames and answers, or steps aside.

In-process and property-based: hypothesis generates requests of every shape around a
mixed-type signature; for each one the fast path accepts, the DataFrame it builds must
equal what MLflow's parsing + schema enforcement build, and the answer must equal the
answer of MLflow's own path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packager_server.fastpath import FastPath, _mlflow_frame
from packager_server.scoring import Scorer

COLUMNS = {"d": "double", "f": "float", "l": "long", "i": "integer", "b": "boolean", "s": "string"}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(max_size=5),
)
# Values mostly of the right type, sometimes anything (to exercise the fallbacks).
typed = {
    "double": st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
    | st.integers(min_value=-(2**60), max_value=2**60),
    "float": st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-1000, 1000),
    "long": st.integers(min_value=-(2**64), max_value=2**64),
    "integer": st.integers(min_value=-(2**33), max_value=2**33),
    "boolean": st.booleans(),
    "string": st.text(max_size=8),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    names = list(COLUMNS)
    if draw(st.booleans()):
        names = draw(st.permutations(names))
    if draw(st.integers(0, 9)) == 0:
        names = names[:-1]  # a missing column
    if draw(st.integers(0, 9)) == 0:
        names = [*names, "extra"]
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        row = []
        for name in names:
            strategy = typed.get(COLUMNS.get(name, ""), scalars)
            row.append(draw(scalars if draw(st.integers(0, 19)) == 0 else strategy))
        rows.append(row)
    body: dict[str, Any]
    if draw(st.booleans()):
        body = {"dataframe_split": {"columns": names, "data": rows}}
    else:
        body = {"dataframe_records": [dict(zip(names, r, strict=True)) for r in rows]}
    if draw(st.booleans()):
        body["params"] = {"scale": draw(st.floats(-10, 10) | st.integers(-5, 5))}
    return body


@pytest.fixture(scope="module")
def mixed_model(server_models: Path) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(server_models / "mixed"))


def test_fast_path_is_enabled_for_scalar_signatures(mixed_model: Any) -> None:
    assert FastPath.build(mixed_model) is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests())
def test_fast_path_matches_mlflow(mixed_model: Any, body: dict[str, Any]) -> None:
    fast = FastPath.build(mixed_model)
    assert fast is not None
    raw = json.dumps(body).encode()
    request = fast.parse(raw, "application/json")
    exact = Scorer(mixed_model, fast_path=False).invoke(raw, "application/json")
    if request is None:
        return  # MLflow's path answers; nothing to compare
    expected = _mlflow_frame(mixed_model, {k: v for k, v in body.items() if k != "params"})
    pd.testing.assert_frame_equal(request.frame, expected, check_exact=True)
    answer = Scorer(mixed_model).invoke(raw, "application/json")
    assert (answer.status, answer.route) == (exact.status, "fast")
    assert json.loads(answer.body) == json.loads(exact.body)


def test_fallbacks(mixed_model: Any) -> None:
    fast = FastPath.build(mixed_model)
    assert fast is not None
    good = {"d": 1.0, "f": 1.0, "l": 1, "i": 1, "b": True, "s": "x"}
    assert fast.parse(json.dumps({"dataframe_records": [good]}).encode(), "application/json")
    for body, content_type in [
        ({"dataframe_records": [{**good, "l": 2**63}]}, "application/json"),  # overflow
        ({"dataframe_records": [{**good, "i": 2**31}]}, "application/json"),
        ({"dataframe_records": [{**good, "d": None}]}, "application/json"),
        ({"dataframe_records": [{**good, "b": 1}]}, "application/json"),
        (
            {
                "dataframe_split": {
                    "columns": list(good),
                    "data": [list(good.values())],
                    "index": [7],
                }
            },
            "application/json",
        ),
        ({"inputs": {k: [v] for k, v in good.items()}}, "application/json"),
        ({"dataframe_records": [good], "params": {"unknown": 1}}, "application/json"),
        ({"dataframe_records": [good]}, "application/json; charset=latin-1"),
        ({"dataframe_records": [good]}, "text/csv"),
        ({"dataframe_records": []}, "application/json"),
    ]:
        assert fast.parse(json.dumps(body).encode(), content_type) is None, body


def test_fast_path_takes_most_well_typed_requests(mixed_model: Any) -> None:
    """Not vacuous: a seeded sample of requests, most of them fast, all equal to MLflow's."""
    import random

    rng = random.Random(20261122)
    fast = FastPath.build(mixed_model)
    assert fast is not None
    fast_scorer, exact_scorer = Scorer(mixed_model), Scorer(mixed_model, fast_path=False)
    taken = 0
    for n in range(120):
        names = rng.sample(list(COLUMNS), k=len(COLUMNS))
        rows = [[_value(rng, COLUMNS[name]) for name in names] for _ in range(rng.randint(1, 5))]
        body: dict[str, Any] = (
            {"dataframe_split": {"columns": names, "data": rows}}
            if n % 2
            else {"dataframe_records": [dict(zip(names, r, strict=True)) for r in rows]}
        )
        raw = json.dumps(body).encode()
        answer = fast_scorer.invoke(raw, "application/json")
        exact = exact_scorer.invoke(raw, "application/json")
        assert answer.status == exact.status == 200
        assert json.loads(answer.body) == json.loads(exact.body)
        taken += answer.route == "fast"
    assert taken == 120


def _value(rng: Any, kind: str) -> Any:
    if kind in ("double", "float"):
        return rng.choice([rng.uniform(-1e6, 1e6), rng.randint(-1000, 1000), 0.5])
    if kind == "long":
        return rng.randint(-(2**62), 2**62)
    if kind == "integer":
        return rng.randint(-(2**31), 2**31 - 1)
    if kind == "boolean":
        return rng.random() < 0.5
    return "".join(rng.choice("abcé€ ") for _ in range(rng.randint(0, 6)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
        min_size=1,
        max_size=6,
    ),
    records=st.booleans(),
)
def test_uniform_columns_build_one_block(
    server_models: Path, values: list[float], records: bool
) -> None:
    """A signature of one dtype takes the 2-D block route; it must equal MLflow too."""
    import mlflow.pyfunc

    model = _sleepy(server_models, mlflow.pyfunc)
    fast = FastPath.build(model)
    assert fast is not None
    assert fast._uniform is not None
    body = (
        {"dataframe_records": [{"x": v} for v in values]}
        if records
        else {"dataframe_split": {"columns": ["x"], "data": [[v] for v in values]}}
    )
    request = fast.parse(json.dumps(body).encode(), "application/json")
    assert request is not None
    pd.testing.assert_frame_equal(request.frame, _mlflow_frame(model, body), check_exact=True)


_LOADED: dict[str, Any] = {}


def _sleepy(server_models: Path, pyfunc: Any) -> Any:
    if "sleepy" not in _LOADED:
        _LOADED["sleepy"] = pyfunc.load_model(str(server_models / "sleepy"))
    return _LOADED["sleepy"]
