"""The model signature: inputs, outputs and params, parsed from MLmodel's JSON strings.

MLflow stores each part as a JSON string inside YAML. Column-based schemas are lists of
``{"name", "type", "required"}``; tensor schemas are ``{"type": "tensor", "tensor-spec":
{"dtype", "shape"}}``; params are ``{"name", "type", "default", "shape"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from packager.errors import ModelFormatError


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One input or output column, or one tensor."""

    name: str | None
    type: str  # MLflow type ("double", "string", …) or "tensor"
    required: bool = True
    dtype: str | None = None  # tensors only
    shape: tuple[int, ...] | None = None  # tensors only; -1 is a variable dimension
    detail: str | None = None  # the raw JSON of nested types (array, object, map)


@dataclass(frozen=True, kw_only=True)
class SchemaSpec:
    kind: Literal["columns", "tensors"]
    fields: tuple[FieldSpec, ...]


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    name: str
    type: str
    default: Any
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Signature:
    inputs: SchemaSpec | None
    outputs: SchemaSpec | None
    params: tuple[ParamSpec, ...] = ()


def parse_signature(raw: object) -> Signature | None:
    """Parse MLmodel's ``signature`` mapping (or None when the model has none)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelFormatError("MLmodel: 'signature' must be a mapping with inputs/outputs/params")
    return Signature(
        inputs=_schema(raw.get("inputs"), "signature.inputs"),
        outputs=_schema(raw.get("outputs"), "signature.outputs"),
        params=_params(raw.get("params"), "signature.params"),
    )


def _load(value: object, where: str) -> list[dict[str, Any]] | None:
    if value in (None, ""):
        return None
    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"MLmodel: {where} is not valid JSON ({err.msg})") from err
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ModelFormatError(f"MLmodel: {where} must be a JSON list of objects")
    return data


def _schema(value: object, where: str) -> SchemaSpec | None:
    items = _load(value, where)
    if items is None:
        return None
    fields = []
    tensors = bool(items) and all(item.get("type") == "tensor" for item in items)
    for index, item in enumerate(items):
        if "type" not in item:
            raise ModelFormatError(f"MLmodel: {where}[{index}] has no 'type'")
        if item["type"] == "tensor":
            spec = item.get("tensor-spec")
            if not isinstance(spec, dict) or "dtype" not in spec:
                raise ModelFormatError(f"MLmodel: {where}[{index}] tensor has no 'tensor-spec'")
            fields.append(
                FieldSpec(
                    name=item.get("name"),
                    type="tensor",
                    dtype=str(spec["dtype"]),
                    shape=_shape(spec.get("shape")),
                    required=bool(item.get("required", True)),
                )
            )
            continue
        type_name = item["type"] if isinstance(item["type"], str) else "object"
        nested = {k: v for k, v in item.items() if k not in ("name", "type", "required")}
        fields.append(
            FieldSpec(
                name=item.get("name"),
                type=type_name,
                required=bool(item.get("required", True)),
                detail=json.dumps(nested, sort_keys=True) if nested else None,
            )
        )
    return SchemaSpec(kind="tensors" if tensors else "columns", fields=tuple(fields))


def _params(value: object, where: str) -> tuple[ParamSpec, ...]:
    items = _load(value, where) or []
    params = []
    for index, item in enumerate(items):
        if "name" not in item or "type" not in item:
            raise ModelFormatError(f"MLmodel: {where}[{index}] needs 'name' and 'type'")
        params.append(
            ParamSpec(
                name=str(item["name"]),
                type=str(item["type"]),
                default=item.get("default"),
                shape=_shape(item.get("shape")),
            )
        )
    return tuple(params)


def _shape(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value):
        return tuple(value)
    raise ModelFormatError(f"MLmodel: shape {value!r} must be a list of integers")
