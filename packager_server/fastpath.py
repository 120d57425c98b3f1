"""A faster route for the most common request: a JSON DataFrame of scalar columns.

MLflow parses such a request into a DataFrame (~0.5 ms), casts it to the signature
(``cast_df_types_according_to_schema``), then ``PyFuncModel.predict`` enforces the schema
again (~0.3-1.6 ms) before calling the model. For a request whose columns are exactly the
signature's and whose values are already of the right JSON types, the result of all that
work is known in advance: the columns in signature order, with the dtypes MLflow's
enforcement produces. This module builds that DataFrame directly and calls the model's
predict function as ``PyFuncModel`` would.

Safety rules:

* Only requests we can prove equivalent take this route; everything else (nulls, ints out
  of range, missing or extra columns, an index, params the model doesn't declare, LLM
  keys, CSV, parquet, tensors) returns ``None`` and goes through MLflow's own code, so
  errors are MLflow's errors.
* At load time the fast path builds a sample row both ways and compares the frames; if
  MLflow's enforcement would produce anything else (a future MLflow or pandas), the fast
  path turns itself off for that model.
* The differential tests run random requests through both routes and compare the
  predictions (tests/server/test_fastpath_equivalence.py).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import StringIO
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)
_EXACT_FLOAT_INT = 2**53  # ints beyond this change value when cast to float64


def _is_number(value: object) -> bool:
    kind = type(value)
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    return kind is int and -_EXACT_FLOAT_INT <= value <= _EXACT_FLOAT_INT  # type: ignore[operator]


def _in_range(bounds: tuple[int, int]) -> Callable[[object], bool]:
    low, high = bounds
    return lambda value: type(value) is int and low <= value <= high


_ACCEPTS: dict[str, Callable[[object], bool]] = {
    "double": _is_number,
    "float": _is_number,
    "long": _in_range(_INT64),
    "integer": _in_range(_INT32),
    "boolean": lambda value: type(value) is bool,
    "string": lambda value: type(value) is str,
}

_SAMPLE: dict[str, object] = {
    "double": 1.5,
    "float": 2.5,
    "long": 3,
    "integer": 4,
    "boolean": True,
    "string": "s",
}


@dataclass(frozen=True)
class FastRequest:
    """A request the fast path can answer: the enforced frame and the raw params."""

    frame: Any  # pandas.DataFrame
    params: dict[str, Any] | None


class FastPath:
    """Built once per loaded model by :meth:`build`; ``None`` when the model can't use it."""

    def __init__(self, model: Any, names: list[str], types: list[str], dtypes: list[Any]) -> None:
        self._model = model
        self._names = names
        self._name_set = frozenset(names)
        self._checks = [_ACCEPTS[t] for t in types]
        self._dtypes = dtypes
        first = dtypes[0] if dtypes else None
        uniform = isinstance(first, np.dtype) and all(d == first for d in dtypes)
        self._uniform = first if uniform else None
        self._params_schema = model.metadata.get_params_schema()
        self._param_names = (
            frozenset(p.name for p in self._params_schema.params)
            if self._params_schema
            else frozenset()
        )
        predict_fn = model._predict_fn  # what PyFuncModel._predict calls
        params_arg = inspect.signature(predict_fn).parameters.get("params")
        self._passes_params = bool(params_arg and params_arg.kind != inspect.Parameter.VAR_KEYWORD)
        self._predict_fn = predict_fn

    # -- construction ----------------------------------------------------------------

    @classmethod
    def build(cls, model: Any) -> FastPath | None:
        reason = _ineligible(model)
        if reason:
            log.info("fast path off: %s", reason)
            return None
        schema = model.metadata.get_input_schema()
        names = [spec.name for spec in schema.inputs]
        types = [spec.type.name for spec in schema.inputs]
        try:
            expected = _mlflow_frame(
                model,
                {"dataframe_split": {"columns": names, "data": [[_SAMPLE[t] for t in types]]}},
            )
        except Exception as err:  # noqa: BLE001 - any failure means: use MLflow's path
            log.info("fast path off: MLflow could not parse a sample row (%s)", err)
            return None
        fast = cls(model, names, types, [expected[name].dtype for name in names])
        ours = fast._frame([[_SAMPLE[t] for t in types]])
        import pandas as pd  # noqa: PLC0415 - pandas comes with mlflow; imported late

        try:
            pd.testing.assert_frame_equal(ours, expected, check_exact=True)
        except AssertionError as err:
            log.warning("fast path off: its frame differs from MLflow's (%s)", err)
            return None
        return fast

    # -- per request ------------------------------------------------------------------

    def parse(self, body: bytes, content_type: str) -> FastRequest | None:
        """The request as an enforced frame, or None to use MLflow's path."""
        media, _, rest = content_type.partition(";")
        if media.strip().lower() != "application/json":
            return None
        if rest.strip() and rest.strip().replace(" ", "").lower() != "charset=utf-8":
            return None
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        params = payload.get("params")
        keys = payload.keys() - {"params"}
        if len(keys) != 1 or (params is not None and not self._params_ok(params)):
            return None
        (key,) = keys
        rows = None
        if key == "dataframe_split":
            rows = self._split_rows(payload[key])
        elif key == "dataframe_records":
            rows = self._record_rows(payload[key])
        if rows is None:
            return None
        return FastRequest(frame=self._frame(rows), params=params)

    def predict(self, request: FastRequest) -> tuple[bytes, float]:
        """Run the model as PyFuncModel does after enforcement: MLflow's JSON output, and
        the seconds spent in the model's own predict."""
        from mlflow.models.utils import _enforce_params_schema  # noqa: PLC0415
        from mlflow.pyfunc.scoring_server import predictions_to_json  # noqa: PLC0415

        params = _enforce_params_schema(request.params, self._params_schema)
        started = time.perf_counter()
        if self._passes_params:
            raw = self._predict_fn(request.frame, params=params)
        else:
            raw = self._predict_fn(request.frame)
        model_seconds = time.perf_counter() - started
        out = StringIO()
        predictions_to_json(raw, out)  # type: ignore[no-untyped-call]
        return out.getvalue().encode(), model_seconds

    # -- helpers ----------------------------------------------------------------------

    def _params_ok(self, params: object) -> bool:
        # Only params the schema declares; MLflow warns about and drops others, and
        # validates types in _enforce_params_schema (which the fast path also calls).
        return isinstance(params, dict) and params.keys() <= self._param_names

    def _split_rows(self, split: object) -> list[list[Any]] | None:
        if not isinstance(split, dict) or split.keys() != {"columns", "data"}:
            return None
        columns, data = split["columns"], split["data"]
        if (
            not isinstance(columns, list)
            or len(columns) != len(self._names)
            or set(columns) != self._name_set
            or not isinstance(data, list)
            or not data
        ):
            return None
        order = [columns.index(name) for name in self._names]
        width = len(columns)
        rows = []
        for row in data:
            if not isinstance(row, list) or len(row) != width:
                return None
            rows.append([row[i] for i in order])
        return rows if self._typed(rows) else None

    def _record_rows(self, records: object) -> list[list[Any]] | None:
        if not isinstance(records, list) or not records:
            return None
        rows = []
        for record in records:
            if not isinstance(record, dict) or record.keys() != self._name_set:
                return None
            rows.append([record[name] for name in self._names])
        return rows if self._typed(rows) else None

    def _typed(self, rows: list[list[Any]]) -> bool:
        checks = self._checks
        return all(check(value) for row in rows for check, value in zip(checks, row, strict=True))

    def _frame(self, rows: list[list[Any]]) -> Any:
        import numpy as np  # noqa: PLC0415
        import pandas as pd  # noqa: PLC0415

        if self._uniform is not None:  # one 2-D block: several times faster to build
            return pd.DataFrame(np.array(rows, dtype=self._uniform), columns=self._names)

        columns: list[tuple[Any, ...]] = (
            list(zip(*rows, strict=True)) if rows else [() for _ in self._names]
        )
        data = {}
        for name, dtype, values in zip(self._names, self._dtypes, columns, strict=True):
            if isinstance(dtype, np.dtype):
                data[name] = np.asarray(values, dtype=dtype)
            else:  # pandas extension dtypes (pandas 3's default string dtype)
                data[name] = pd.array(list(values), dtype=dtype)
        return pd.DataFrame(data, columns=self._names)


def _ineligible(model: Any) -> str | None:
    """Why this model can't take the fast path, or None."""
    meta = model.metadata
    schema = meta.get_input_schema()
    if schema is None:
        return "the model has no input signature"
    if schema.is_tensor_spec():
        return "tensor signatures go through MLflow's conversion"
    if getattr(meta, "_is_signature_from_type_hint", lambda: False)():
        return "signatures from type hints take raw 'inputs'"
    if getattr(meta, "_is_type_hint_from_example", lambda: False)():
        return "type hints from examples convert the frame"
    if meta.metadata and meta.metadata.get("dependencies_schemas"):
        return "the model declares dependency schemas"
    for spec in schema.inputs:
        type_name = getattr(getattr(spec, "type", None), "name", None)
        if spec.name is None or type_name not in _ACCEPTS or not spec.required:
            return (
                f"column {spec.name!r} ({type_name}, required={spec.required}) is not a "
                "required scalar column"
            )
    if not hasattr(model, "_predict_fn"):
        return "this MLflow's PyFuncModel has no _predict_fn"
    return None


def _mlflow_frame(model: Any, payload: dict[str, Any]) -> Any:
    """What MLflow's parsing + schema enforcement make of ``payload``."""
    from mlflow.models.utils import _enforce_schema  # noqa: PLC0415
    from mlflow.pyfunc.scoring_server import infer_and_parse_data  # noqa: PLC0415

    schema = model.metadata.get_input_schema()
    return _enforce_schema(infer_and_parse_data(payload, schema), schema)
