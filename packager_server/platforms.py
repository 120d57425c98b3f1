"""The cloud platforms' conventions, so that one image runs unchanged on each of them.

========================  ===============================================================
platform                  what the server honours
========================  ===============================================================
Cloud Run, Azure ML, …    ``PORT``: the port the platform sends traffic to
Vertex AI (custom         ``AIP_HTTP_PORT``; ``AIP_HEALTH_ROUTE`` answered like
containers)               ``/ready``; ``AIP_PREDICT_ROUTE`` takes ``{"instances": […],
                          "parameters": {…}}`` and answers ``{"predictions": […]}``
SageMaker                 the argument ``serve`` (``docker run IMAGE serve``); ``/ping``
                          and ``/invocations`` on 8080 or ``SAGEMAKER_BIND_TO_PORT``;
                          ``SAGEMAKER_MODEL_SERVER_WORKERS`` and ``…_TIMEOUT``; batch
                          transform's bodies (below) and ``GET /execution-parameters``
========================  ===============================================================

The port, first found wins: ``--port``, ``SAGEMAKER_BIND_TO_PORT``, ``AIP_HTTP_PORT``,
``PORT``, ``PACKAGER_PORT``, 8080. A platform's variable beats ``PACKAGER_PORT`` (which the
image sets) because a server listening anywhere else than where the platform routes gets
no traffic at all. ``SAGEMAKER_SAFE_PORT_RANGE`` does not apply: the server opens no port
but the one it serves (its processes talk over socket pairs and shared memory).

Batch transform splits a file into records and posts them to ``/invocations``:

* ``application/jsonlines`` (also ``application/jsonl``, ``application/x-ndjson``): one
  JSON value per line, each one row: an object (column name to value) or an array (the
  values in the signature's column order). The answer is JSON lines too, one prediction a
  line, unless ``Accept`` asks for ``application/json`` (MLflow's answer).
* ``text/csv; header=absent`` (RFC 4180's parameter): rows without a header line, in the
  signature's column order. Plain ``text/csv`` keeps MLflow's meaning (the first line is
  the header), so a transform job of header-less files sets that content type.

``Accept: text/csv`` (the transform job's ``Accept``, which batch transform sends with each
request; the answer its built-in algorithms give for it) turns the predictions into CSV
rows without a header, one a record, so that ``AssembleWith: Line`` and ``JoinSource:
Input`` line them up with the input's rows: a scalar a line, a list's or a record's values
in order, named outputs side by side. Predictions that are not such a table are a 406.
MLflow's server ignores ``Accept``; without ``text/csv`` first in it nothing changes.

Each is turned into the MLflow request it means and scored by the same
:class:`~packager_server.scoring.Scorer` as ``/invocations``, so schema enforcement, error
messages and predictions are MLflow's.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any

from packager_server.scoring import JSON, Answer, Scorer, error_answer

JSON_LINES = ("application/jsonlines", "application/jsonl", "application/x-ndjson")
CSV = "text/csv"

Invoke = Callable[[bytes, "str | None"], Answer]


# -- Vertex AI ---------------------------------------------------------------------------


def vertex_invoker(scorer: Scorer) -> Invoke:
    """The prediction route's handler: Vertex AI's request becomes MLflow's ``instances``
    request (``parameters`` its ``params``), whose answer already is ``{"predictions"}``."""

    def invoke(body: bytes, content_type: str | None) -> Answer:
        if content_type is not None and content_type.split(";", 1)[0].strip() != JSON:
            return error_answer(415, "BAD_REQUEST", "Vertex AI requests are application/json")
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return error_answer(400, "BAD_REQUEST", "the body is not valid JSON")
        if not isinstance(request, dict) or "instances" not in request:
            return error_answer(
                400,
                "BAD_REQUEST",
                'a Vertex AI request is {"instances": [...], "parameters": {...}}',
            )
        unknown = sorted(set(request) - {"instances", "parameters"})
        if unknown:
            return error_answer(
                400, "BAD_REQUEST", f"unknown field(s) {unknown}: expected instances, parameters"
            )
        mlflow_request: dict[str, Any] = {"instances": request["instances"]}
        if request.get("parameters") is not None:
            if not isinstance(request["parameters"], dict):
                return error_answer(400, "BAD_REQUEST", "parameters must be a JSON object")
            mlflow_request["params"] = request["parameters"]
        return scorer.invoke(json.dumps(mlflow_request).encode(), JSON)

    return invoke


# -- SageMaker batch transform -----------------------------------------------------------


def batch_format(content_type: str) -> str | None:
    """``"jsonlines"`` or ``"csv"`` for batch transform's bodies; ``None`` for MLflow's."""
    mime, _, parameters = content_type.partition(";")
    mime = mime.strip().lower()
    if mime in JSON_LINES:
        return "jsonlines"
    if mime == "text/csv":
        fields = {k.strip().lower(): v.strip().lower() for k, _, v in _pairs(parameters)}
        if fields.get("header") == "absent":
            return "csv"
    return None


def _pairs(parameters: str) -> list[tuple[str, str, str]]:
    return [p.partition("=") for p in parameters.split(";") if p.strip()]


def batch_invoker(scorer: Scorer, kind: str, accept: str | None) -> Invoke:
    """The handler of a batch transform body (``kind`` from :func:`batch_format`)."""
    lines_out = _wants_lines(accept, default=kind == "jsonlines")

    def invoke(body: bytes, content_type: str | None) -> Answer:
        if kind == "jsonlines":
            request = _jsonlines_request(body, _columns(scorer))
            if isinstance(request, Answer):
                return request
            answer = scorer.invoke(json.dumps(request).encode(), JSON)
        else:
            answer = _csv_invoke(scorer, body, content_type or "")
        return _as_lines(answer) if lines_out else answer

    return invoke


def _accepted(accept: str | None) -> list[str]:
    if not accept:
        return []
    return [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]


def wants_csv(accept: str | None) -> bool:
    """Whether the client asks for CSV first (SageMaker sends one type)."""
    types = _accepted(accept)
    return bool(types) and types[0] == CSV


def _wants_lines(accept: str | None, *, default: bool) -> bool:
    types = _accepted(accept)
    if not types:
        return default
    if types[0] == CSV:
        return False  # JSON for csv_output to turn into rows
    if any(t in JSON_LINES for t in types):
        return True
    if JSON in types:
        return False
    return default


def _columns(scorer: Scorer) -> list[str] | None:
    """The signature's column names, in order (``None`` without a column signature)."""
    schema = scorer.input_schema
    if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
        return None
    return list(schema.input_names())


def _jsonlines_request(body: bytes, columns: list[str] | None) -> dict[str, Any] | Answer:
    rows: list[Any] = []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return error_answer(400, "BAD_REQUEST", "the body is not UTF-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):
            return error_answer(400, "BAD_REQUEST", f"line {number} is not valid JSON")
        if not isinstance(rows[-1], (dict, list)):
            return error_answer(
                400, "BAD_REQUEST", f"line {number}: a row is a JSON object or array"
            )
    if not rows:
        return error_answer(400, "BAD_REQUEST", "the body has no JSON lines")
    if all(isinstance(row, dict) for row in rows):
        return {"dataframe_records": rows}
    if not all(isinstance(row, list) for row in rows):
        return error_answer(
            400, "BAD_REQUEST", "rows are either all JSON objects or all JSON arrays"
        )
    if columns is None:
        return {"instances": rows}
    return {"dataframe_split": {"columns": columns, "data": rows}}


def _csv_invoke(scorer: Scorer, body: bytes, content_type: str) -> Answer:
    """Header-less CSV: MLflow's CSV request with the signature's header line put first."""
    columns = _columns(scorer)
    if columns is None:
        return error_answer(
            400,
            "BAD_REQUEST",
            "text/csv; header=absent needs a model signature with column names",
        )
    header = ",".join(_csv_field(name) for name in columns).encode()
    kept = [p for p in content_type.split(";")[1:] if p.split("=", 1)[0].strip() != "header"]
    return scorer.invoke(header + b"\n" + body, ";".join(["text/csv", *kept]))


def _csv_field(value: str) -> str:
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _as_lines(answer: Answer) -> Answer:
    """MLflow's ``{"predictions": [...]}`` as JSON lines, one prediction a line (errors
    stay JSON)."""
    if answer.status != 200:
        return answer
    decoded = json.loads(answer.body)
    if not isinstance(decoded, dict):
        return answer
    predictions = decoded.get("predictions")
    if isinstance(predictions, dict):  # named outputs of a tensor model: one row each
        names = list(predictions)
        predictions = [
            dict(zip(names, row, strict=True)) for row in zip(*predictions.values(), strict=True)
        ]
    if not isinstance(predictions, list):
        return answer
    body = "".join(json.dumps(p) + "\n" for p in predictions).encode()
    return Answer(
        status=200,
        body=body,
        route=answer.route,
        content_type=JSON_LINES[0],
        score_seconds=answer.score_seconds,
        model_seconds=answer.model_seconds,
    )


def csv_output(invoke: Invoke) -> Invoke:
    """``invoke`` answering CSV rows (``Accept: text/csv``); errors stay JSON."""

    def invoke_csv(body: bytes, content_type: str | None) -> Answer:
        answer = invoke(body, content_type)
        if answer.status != 200:
            return answer
        rows = _rows(json.loads(answer.body))
        if rows is None:
            return error_answer(
                406,
                "BAD_REQUEST",
                "the predictions are not a table of scalars, so they have no CSV form: "
                "ask for application/json",
            )
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return Answer(
            status=200,
            body=out.getvalue().encode(),
            route=answer.route,
            content_type=CSV,
            score_seconds=answer.score_seconds,
            model_seconds=answer.model_seconds,
        )

    return invoke_csv


_SCALAR = (str, int, float, bool, type(None))


def _rows(decoded: Any) -> list[list[Any]] | None:
    """MLflow's ``{"predictions": ...}`` as rows of scalars, or ``None`` when it is none."""
    predictions = decoded.get("predictions") if isinstance(decoded, dict) else None
    if isinstance(predictions, dict):  # named outputs: the columns of one table
        columns = list(predictions.values())
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) > 1:
            return None
        predictions = [list(row) for row in zip(*columns, strict=True)]
    if not isinstance(predictions, list):
        return None
    rows: list[list[Any]] = []
    for prediction in predictions:
        if isinstance(prediction, dict):
            row = list(prediction.values())
        elif isinstance(prediction, list):
            row = prediction
        else:
            row = [prediction]
        if not all(isinstance(value, _SCALAR) for value in row):
            return None
        rows.append(row)
    return rows


def execution_parameters(*, workers: int, max_payload: int) -> Answer:
    """``GET /execution-parameters``: batch transform asks it for its defaults. One
    request per worker at a time; multi-record batches up to the payload limit."""
    body = {
        "MaxConcurrentTransforms": workers,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": max(1, max_payload // (1024 * 1024)),
    }
    return Answer(status=200, body=json.dumps(body).encode())
