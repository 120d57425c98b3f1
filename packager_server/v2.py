"""The Open Inference Protocol (V2, REST): what KServe, Seldon and Triton clients speak.

=======================================================  ======  =========================
path                                                     method  answer
=======================================================  ======  =========================
/v2/health/live, /v2/health/ready                        GET     like /live and /ready
/v2                                                      GET     server metadata
/v2/models/{name}[/versions/{v}]                         GET     model metadata
/v2/models/{name}[/versions/{v}]/ready                   GET     200 once loaded
/v2/models/{name}[/versions/{v}]/infer                   POST    inference
=======================================================  ======  =========================

The model's signature is its metadata: a column-based signature has one input tensor per
column (shape ``[-1, 1]``, as MLServer describes columns; ``[N]`` is accepted too), a
tensor-based one its tensors with their shapes. An inference request's tensors become
the MLflow request they mean (``dataframe_split`` for columns, ``inputs`` for tensors;
``parameters`` become ``params``) and are scored by the same
:class:`~packager_server.scoring.Scorer` as ``/invocations``, so schema enforcement and
predictions are MLflow's. Predictions become named outputs: a DataFrame's columns, a
dict's keys, or one tensor named as the signature's one output (else ``output-0``).

Datatypes: BOOL, INT8-64, UINT8-64, FP16/32/64 and BYTES (UTF-8 strings in JSON). A
request's values must fit its declared datatype, and its kind (boolean, integer, floating
point, bytes) must be the signature's (integers are accepted for floating point inputs);
integers must fit the model's integer type, which MLflow's enforcement would wrap around.
Errors are JSON with the protocol's ``error`` and the ``error_code`` and ``message`` of
MLflow's endpoints, and never echo request data; an unknown model or version is a 404.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from packager_server.platforms import Invoke
from packager_server.scoring import JSON, Answer, Scorer

_INT_RANGES = {
    f"{sign}INT{bits}": ((0, 2**bits - 1) if sign else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    for sign in ("", "U")
    for bits in (8, 16, 32, 64)
}
DATATYPES = frozenset({"BOOL", "FP16", "FP32", "FP64", "BYTES", *_INT_RANGES})
_MLFLOW_TYPES = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}
# Parameters the protocol itself defines: not the model's.
_PROTOCOL_PARAMETERS = frozenset({"content_type", "headers"})


COLUMN = (-1, 1)  # the metadata shape of a column (of a column-based signature)


class RequestError(ValueError):
    """A request the protocol or the signature refuses (answered 400)."""


@dataclass(frozen=True)
class Tensor:
    """A metadata tensor: what the model takes or gives."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def error(status: int, code: str, message: str) -> Answer:
    body = {"error": message, "error_code": code, "message": message}
    return Answer(status=status, body=json.dumps(body).encode())


def _kind(datatype: str) -> str:
    if datatype.startswith(("INT", "UINT")):
        return "integer"
    return {"BOOL": "boolean", "BYTES": "bytes"}.get(datatype, "floating point")


def _datatype(spec_type: Any) -> str:
    """A signature type (MLflow's DataType or a numpy dtype) as a V2 datatype."""
    name = getattr(spec_type, "name", None)
    if name in _MLFLOW_TYPES:
        return _MLFLOW_TYPES[name]
    kind = getattr(spec_type, "kind", None)
    size = getattr(spec_type, "itemsize", 0)
    if kind == "b":
        return "BOOL"
    if kind in ("i", "u"):
        return f"{'U' if kind == 'u' else ''}INT{8 * size}"
    if kind == "f":
        return f"FP{8 * size}"
    return "BYTES"  # strings, bytes, objects, and MLflow's arrays, objects and maps


def tensors(schema: Any, prefix: str) -> list[Tensor]:
    """A signature's inputs or outputs as metadata tensors (none without a signature).
    Unnamed ones are ``{prefix}-{index}``, as MLServer names them, so that clients written
    for it find them."""
    if schema is None:
        return []
    found = []
    for index, spec in enumerate(schema.inputs):
        name = spec.name or f"{prefix}-{index}"
        if schema.is_tensor_spec():
            found.append(Tensor(name, _datatype(spec.type), tuple(spec.shape)))
        else:
            found.append(Tensor(name, _datatype(spec.type), COLUMN))
    return found


class OpenInference:
    """The V2 endpoints of one loaded model."""

    def __init__(self, scorer: Scorer, *, name: str, version: str) -> None:
        self.scorer = scorer
        self.name = name
        self.version = version
        schema = scorer.input_schema
        self.inputs = tensors(schema, "input")
        self.outputs = tensors(scorer.model.metadata.get_output_schema(), "output")
        self._tensor_based = schema is not None and schema.is_tensor_spec()
        self._named = schema is not None and schema.has_input_names()
        self._required = {
            t.name
            for t, spec in zip(self.inputs, schema.inputs if schema else [], strict=True)
            if getattr(spec, "required", True)
        }
        self._metadata = json.dumps(
            {
                "name": name,
                "versions": [version] if version else [],
                "platform": "mlflow",
                "inputs": [t.json() for t in self.inputs],
                "outputs": [t.json() for t in self.outputs],
            }
        ).encode()

    # -- routing ------------------------------------------------------------------------

    def target(self, path: str) -> tuple[str, Answer | None]:
        """What a ``/v2/models/...`` path asks of this model: ``("metadata" | "ready" |
        "infer" | "", error)``; the error is a 404 for another model or version."""
        parts = path[len("/v2/models/") :].split("/")
        action = ""
        if parts and parts[-1] in ("ready", "infer"):
            action = parts.pop()
        if len(parts) == 3 and parts[1] == "versions":
            if parts[0] == self.name and parts[2] == self.version and self.version:
                return action or "metadata", None
            return "", self._unknown()
        if len(parts) == 1 and parts[0] == self.name:
            return action or "metadata", None
        return "", self._unknown()

    def _unknown(self) -> Answer:
        # The requested name is not echoed: it is request data.
        served = self.name + (f" version {self.version}" if self.version else "")
        return error(404, "RESOURCE_DOES_NOT_EXIST", f"unknown model; this server serves {served}")

    def metadata(self) -> Answer:
        return Answer(status=200, body=self._metadata)

    def server_metadata(self, version: str) -> Answer:
        body = {"name": "packager_server", "version": version, "extensions": []}
        return Answer(status=200, body=json.dumps(body).encode())

    # -- inference ----------------------------------------------------------------------

    def invoker(self) -> Invoke:
        def invoke(body: bytes, content_type: str | None) -> Answer:
            if content_type is not None and content_type.split(";", 1)[0].strip() != JSON:
                return error(415, "BAD_REQUEST", "inference requests are application/json")
            try:
                request = json.loads(body)
                mlflow_request, wanted, request_id = self._mlflow_request(request)
            except RecursionError:
                return error(400, "BAD_REQUEST", "the JSON body is nested too deeply")
            except RequestError as err:
                return error(400, "BAD_REQUEST", str(err))
            except ValueError:
                return error(400, "BAD_REQUEST", "the body is not valid JSON")
            answer = self.scorer.invoke(json.dumps(mlflow_request).encode(), JSON)
            return self._response(answer, wanted, request_id)

        return invoke

    def _mlflow_request(self, request: Any) -> tuple[dict[str, Any], list[str] | None, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise RequestError('an inference request is {"inputs": [...], ...}')
        if not request["inputs"]:
            raise RequestError("inputs is empty")
        request_id = request.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError("id must be a string")
        decoded = [self._decode(tensor) for tensor in request["inputs"]]
        names = [name for name, _, _ in decoded]
        if len(set(names)) != len(names):
            raise RequestError("an input is given twice")
        if self.inputs:
            missing = sorted(self._required - set(names))
            if missing:
                raise RequestError(f"missing input(s) {missing}")
        mlflow_request = self._frame(decoded) if not self._tensor_based else self._tensors(decoded)
        parameters = request.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise RequestError("parameters must be a JSON object")
            params = {k: v for k, v in parameters.items() if k not in _PROTOCOL_PARAMETERS}
            if params:
                mlflow_request["params"] = params
        return mlflow_request, _wanted_outputs(request.get("outputs")), request_id

    def _decode(self, tensor: Any) -> tuple[str, list[int], list[Any]]:
        """One input tensor: its name, shape and flat values, checked."""
        if not isinstance(tensor, dict):
            raise RequestError("each input is an object with name, shape, datatype and data")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if not isinstance(name, str) or "data" not in tensor:
            raise RequestError("each input has a name (a string), shape, datatype and data")
        expected = next((t for t in self.inputs if t.name == name), None)
        if self.inputs and expected is None:
            known = [t.name for t in self.inputs]
            raise RequestError(f"unknown input; this model's inputs are {known}")
        label = f"input {name!r}" if expected else "an input"
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RequestError(f"{label}: shape must be a list of non-negative integers")
        if datatype not in DATATYPES:
            raise RequestError(f"{label}: datatype must be one of {sorted(DATATYPES)}")
        if expected is not None and not _compatible(datatype, expected.datatype):
            raise RequestError(
                f"{label}: datatype {datatype}, but the model takes {expected.datatype}"
            )
        values = list(_flatten(tensor["data"]))
        if len(values) != math.prod(shape):
            raise RequestError(
                f"{label}: shape {shape} holds {math.prod(shape)} value(s), data has {len(values)}"
            )
        _check_values(values, datatype, label)
        if expected is not None and datatype in _INT_RANGES and expected.datatype in _INT_RANGES:
            # MLflow's schema enforcement would wrap them around silently.
            low, high = _INT_RANGES[expected.datatype]
            if not all(low <= v <= high for v in values):
                raise RequestError(f"{label}: values out of the range of {expected.datatype}")
        if expected is not None and self._tensor_based:
            _check_shape(shape, expected.shape, label)
        return name, shape, values

    def _frame(self, decoded: list[tuple[str, list[int], list[Any]]]) -> dict[str, Any]:
        """Column inputs (each of shape [N] or [N, 1]) as MLflow's ``dataframe_split``."""
        rows: set[int] = set()
        for name, shape, values in decoded:
            if len(shape) == 0 or len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                label = f"input {name!r}" if self.inputs else "an input"
                raise RequestError(f"{label}: a column's shape is [N] or [N, 1], got {shape}")
            rows.add(len(values))
        if len(rows) > 1:
            raise RequestError("the inputs have different numbers of rows")
        by_name = {name: values for name, _, values in decoded}
        columns = [t.name for t in self.inputs if t.name in by_name] or list(by_name)
        data = [list(row) for row in zip(*(by_name[c] for c in columns), strict=True)]
        if self.inputs and not self._named:  # positional columns, in the signature's order
            return {"dataframe_split": {"data": data}}
        return {"dataframe_split": {"columns": columns, "data": data}}

    def _tensors(self, decoded: list[tuple[str, list[int], list[Any]]]) -> dict[str, Any]:
        """Tensor inputs as MLflow's ``inputs`` (by name, or the one unnamed tensor)."""
        nested = {name: _reshape(values, shape) for name, shape, values in decoded}
        if not self._named:
            return {"inputs": next(iter(nested.values()))}
        return {"inputs": nested}

    def _response(self, answer: Answer, wanted: list[str] | None, request_id: Any) -> Answer:
        if answer.status != 200:
            try:
                fields = json.loads(answer.body)
                fields["error"] = fields.get("message", "")
                error_body = json.dumps(fields).encode()
            except (ValueError, TypeError, AttributeError):
                error_body = answer.body
            return Answer(status=answer.status, body=error_body, route=answer.route)
        decoded = json.loads(answer.body)
        # MLflow's answer, except for unified LLM requests, which are answered bare.
        wrapped = isinstance(decoded, dict) and set(decoded) == {"predictions"}
        predictions = decoded["predictions"] if wrapped else decoded
        outputs = self._outputs(predictions)
        if wanted is not None:
            have = {o["name"] for o in outputs}
            if not set(wanted) <= have:
                return error(
                    400, "BAD_REQUEST", f"unknown output; this model's outputs are {sorted(have)}"
                )
            outputs = [o for o in outputs if o["name"] in wanted]
        body: dict[str, Any] = {"model_name": self.name, "outputs": outputs}
        if self.version:
            body["model_version"] = self.version
        if request_id is not None:
            body["id"] = request_id
        return Answer(
            status=200,
            body=json.dumps(body).encode(),
            route=answer.route,
            score_seconds=answer.score_seconds,
            model_seconds=answer.model_seconds,
        )

    def _outputs(self, predictions: Any) -> list[dict[str, Any]]:
        declared = {t.name: t.datatype for t in self.outputs}
        if (
            isinstance(predictions, list)
            and predictions
            and all(isinstance(p, dict) for p in predictions)
        ):  # a DataFrame, as records: one output per column
            names = list(predictions[0])
            columns = {n: [p.get(n) for p in predictions] for n in names}
            return [_output(n, v, declared.get(n), column=True) for n, v in columns.items()]
        if isinstance(predictions, dict):  # named tensors
            return [_output(str(n), v, declared.get(str(n))) for n, v in predictions.items()]
        # One tensor: the signature's one output, or output-0 as the metadata would say.
        if len(self.outputs) == 1:
            only = self.outputs[0]
            return [_output(only.name, predictions, only.datatype, column=only.shape == COLUMN)]
        return [_output("output-0", predictions, None)]


def _output(name: str, value: Any, datatype: str | None, *, column: bool = False) -> dict[str, Any]:
    """One output tensor; a column's values (one per row) have the shape [N, 1]."""
    shape = _shape(value)
    if column and len(shape) == 1 and isinstance(value, list):
        shape = [shape[0], 1]
    data = list(_flatten(value))
    if any(isinstance(v, (dict, list)) for v in data):  # ragged or objects: as JSON text
        data, shape = [json.dumps(v) for v in data], [len(data)]
    return {
        "name": name,
        "datatype": datatype or _infer_datatype(data),
        "shape": shape,
        "data": data,
    }


def _infer_datatype(values: list[Any]) -> str:
    if values and all(isinstance(v, bool) for v in values):
        return "BOOL"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "FP64"
    return "BYTES"


def _wanted_outputs(outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise RequestError('outputs is a list of {"name": ...} objects')
    return [o["name"] for o in outputs]


def _compatible(given: str, expected: str) -> bool:
    if _kind(given) == _kind(expected):
        return True
    return _kind(given) == "integer" and _kind(expected) == "floating point"


def _check_values(values: list[Any], datatype: str, label: str) -> None:
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif datatype == "BYTES":
        ok = all(isinstance(v, str) for v in values)
    elif datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        ok = all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values
        )
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok:
        raise RequestError(f"{label}: data does not match datatype {datatype}")


def _check_shape(given: list[int], expected: tuple[int, ...], label: str) -> None:
    if len(given) != len(expected) or any(
        e not in (-1, g) for g, e in zip(given, expected, strict=True)
    ):
        raise RequestError(f"{label}: shape {given} does not fit the model's {list(expected)}")


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape or [1]


def _reshape(values: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return values
    step = math.prod(shape[1:])
    return [_reshape(values[i : i + step], shape[1:]) for i in range(0, len(values), step)]
