"""Stage 2, ``spec``: a typed, immutable view of what a model needs to be served.

Input: a model directory and its file index (from ``source``). Output: :class:`ModelSpec`.
Nothing here touches the network. Field meanings follow MLflow's model format, see
``shared/reference/mlflow-model-format.md``.
"""

from packager.spec.environment import (
    CondaEnv,
    EnvFile,
    EnvFileKind,
    PythonEnv,
    Wheel,
    WheelsDir,
)
from packager.spec.model import (
    Artifact,
    CodeEntry,
    Flavor,
    InputExample,
    ModelSpec,
    PyfuncFlavor,
    read_spec,
)
from packager.spec.requirements import LineKind, RequirementLine
from packager.spec.signature import FieldSpec, ParamSpec, SchemaSpec, Signature

__all__ = [
    "Artifact",
    "CodeEntry",
    "CondaEnv",
    "EnvFile",
    "EnvFileKind",
    "FieldSpec",
    "Flavor",
    "InputExample",
    "LineKind",
    "ModelSpec",
    "ParamSpec",
    "PyfuncFlavor",
    "PythonEnv",
    "RequirementLine",
    "SchemaSpec",
    "Signature",
    "Wheel",
    "WheelsDir",
    "read_spec",
]
