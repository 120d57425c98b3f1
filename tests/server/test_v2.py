"""The Open Inference Protocol (V2) endpoints of a real server process (issue 14).

Predictions are checked against the same server's ``/invocations`` answer to the MLflow
request the tensors mean: V2 is a second way in, never a second semantics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import packager_server
from tests.conftest import free_port, unavailable, wait_for_http
from tests.server.conftest import Response, ServerProcess, run_server

pytestmark = pytest.mark.slow

COLUMNS = [
    ("d", "FP64"),
    ("f", "FP32"),
    ("l", "INT64"),
    ("i", "INT32"),
    ("b", "BOOL"),
    ("s", "BYTES"),
]
ROWS = [[1.5, 0.5, 3, 5, True, "a"], [-2.0, 1.0, 4, 6, False, "bcd"]]
INFER = "/v2/models/mixed/infer"

# Two more models (the script runs as __main__, so cloudpickle keeps the classes by value):
# rowsums has a tensor signature (float32 rows of 3, one sum per row); frame a column
# signature and a numeric DataFrame for its answer.
EXTRA_MODELS = """
import sys
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.pyfunc.model import PythonModel

class RowSums(PythonModel):
    def predict(self, context, model_input, params=None):
        return np.asarray(model_input).sum(axis=1) * float((params or {}).get("scale", 1.0))

class Frame(PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"sum": model_input["a"] + model_input["b"], "neg": -model_input["a"]})

x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
mlflow.pyfunc.save_model(
    sys.argv[1] + "/rowsums", python_model=RowSums(), input_example=x,
    signature=infer_signature(x, RowSums().predict(None, x), {"scale": 1.0}),
    pip_requirements=["numpy"],
)
frame = pd.DataFrame({"a": [1.5, 2.0], "b": pd.Series([3, 4], dtype="int64")})
mlflow.pyfunc.save_model(
    sys.argv[1] + "/frame", python_model=Frame(), input_example=frame,
    signature=infer_signature(frame, Frame().predict(None, frame)),
    pip_requirements=["pandas"],
)
"""


def _columns(rows: list[list[Any]], shape_suffix: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "datatype": datatype,
            "shape": [len(rows), *shape_suffix],
            "data": [[row[i]] if shape_suffix else row[i] for row in rows],
        }
        for i, (name, datatype) in enumerate(COLUMNS)
    ]


def _infer(server: ServerProcess, request: Any, path: str = INFER) -> Response:
    body = request if isinstance(request, (str, bytes)) else json.dumps(request)
    return server.request("POST", path, body, {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def mixed(server_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("v2-mixed")
    with run_server(
        server_models / "mixed", log_dir, "--workers", "1", "--model-version", "3"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def extra_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v2-models")
    subprocess.run(
        [sys.executable, "-c", EXTRA_MODELS, str(out)], check=True, capture_output=True, timeout=300
    )
    return out


@pytest.fixture(scope="module")
def tensor(extra_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("v2-tensor")
    with run_server(extra_models / "rowsums", log_dir, "--workers", "1") as server:
        yield server


def test_health_and_server_metadata(mixed: ServerProcess) -> None:
    assert mixed.request("GET", "/v2/health/live").status == 200
    assert mixed.request("GET", "/v2/health/ready").status == 200
    meta = mixed.request("GET", "/v2").json()
    assert (meta["name"], meta["version"]) == ("packager_server", packager_server.__version__)
    assert meta["extensions"] == []


def test_health_while_loading(server_models: Path, tmp_path: Path) -> None:
    """Before the model is loaded (the supervisor's loading responder answers), V2's
    liveness is 200 and its readiness 503, like /live and /ready."""
    env = {"SLEEPY_LOAD_SECONDS": "6"}
    with run_server(server_models / "sleepy", tmp_path, env=env, wait_ready=False) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                live = server.request("GET", "/v2/health/live", timeout=5)
            except OSError:  # not listening yet
                time.sleep(0.1)
                continue
            ready = server.request("GET", "/v2/health/ready", timeout=5)
            if ready.status == 503:
                assert live.status == 200
                assert server.request("GET", "/v2/health/live", timeout=5).status == 200
                break
            time.sleep(0.1)
        else:
            pytest.fail("never saw the server loading")
        wait_for_http(f"{server.url}/v2/health/ready", 60, server.process)


def test_model_metadata_from_the_signature(mixed: ServerProcess) -> None:
    for path in ("/v2/models/mixed", "/v2/models/mixed/versions/3"):
        meta = mixed.request("GET", path).json()
        assert meta["name"] == "mixed"
        assert meta["versions"] == ["3"]
        assert meta["platform"] == "mlflow"
        assert meta["inputs"] == [
            {"name": name, "datatype": datatype, "shape": [-1, 1]} for name, datatype in COLUMNS
        ]
        assert meta["outputs"] == [
            {"name": "total", "datatype": "FP64", "shape": [-1, 1]},
            {"name": "flag", "datatype": "BOOL", "shape": [-1, 1]},
            {"name": "label", "datatype": "INT64", "shape": [-1, 1]},
            {"name": "dtypes", "datatype": "BYTES", "shape": [-1, 1]},
        ]


def test_model_ready_and_unknown_models(mixed: ServerProcess) -> None:
    assert mixed.request("GET", "/v2/models/mixed/ready").status == 200
    assert mixed.request("GET", "/v2/models/mixed/versions/3/ready").status == 200
    for path in (
        "/v2/models/other",
        "/v2/models/other/ready",
        "/v2/models/mixed/versions/4",
        "/v2/models/mixed/versions/4/ready",
        "/v2/models/mixed/extra/parts",
    ):
        answer = mixed.request("GET", path)
        assert answer.status == 404, path
        assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert "other" not in answer.json()["error"]  # the request's name is not echoed
    for path in ("/v2/models/other/infer", "/v2/models/mixed/versions/4/infer"):
        assert _infer(mixed, {"inputs": _columns(ROWS)}, path).status == 404


def test_metrics_label_v2_requests_by_route(mixed: ServerProcess) -> None:
    """A V2 path is counted under its route (the model's name and version folded in), not
    as "other"; a path no route matches still is."""

    def count(path: str, status: int) -> int:
        metrics = mixed.request("GET", "/metrics").body.decode()
        found = re.search(
            rf'packager_requests_total\{{[^}}]*path="{re.escape(path)}",status="{status}"\}} (\d+)',
            metrics,
        )
        return int(found.group(1)) if found else 0

    requests = [
        ("GET", "/v2/health/ready", "/v2/health/ready", 200),
        ("GET", "/v2/health/live", "/v2/health/live", 200),
        ("GET", "/v2", "/v2", 200),
        ("GET", "/v2/models/mixed", "/v2/models/{name}", 200),
        ("GET", "/v2/models/mixed/versions/3/ready", "/v2/models/{name}/ready", 200),
        ("GET", "/v2/models/other/ready", "/v2/models/{name}/ready", 404),
        ("POST", "/v2/models/mixed/versions/3/infer", "/v2/models/{name}/infer", 200),
        ("GET", "/v2/models/mixed/extra/parts", "other", 404),
    ]
    for method, path, label, status in requests:
        before = count(label, status)
        if method == "POST":
            assert _infer(mixed, {"inputs": _columns(ROWS)}, path).status == status
        else:
            assert mixed.request(method, path).status == status, path
        assert count(label, status) == before + 1, (path, label)


def test_infer_columns_like_invocations(mixed: ServerProcess) -> None:
    names = [name for name, _ in COLUMNS]
    expected = mixed.invoke(
        {"dataframe_split": {"columns": names, "data": ROWS}, "params": {"scale": 2.0}}
    ).json()["predictions"]
    request = {"id": "req-1", "inputs": _columns(ROWS), "parameters": {"scale": 2.0}}
    for path in (INFER, "/v2/models/mixed/versions/3/infer"):
        answer = _infer(mixed, request, path)
        assert answer.status == 200, answer.body
        body = answer.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("mixed", "3", "req-1")
        outputs = {o["name"]: o for o in body["outputs"]}
        assert list(outputs) == ["total", "flag", "label", "dtypes"]
        for name, output in outputs.items():
            assert output["shape"] == [len(ROWS), 1]
            assert output["data"] == [row[name] for row in expected]
        assert outputs["total"]["datatype"] == "FP64"
        assert outputs["flag"]["datatype"] == "BOOL"
    # [N, 1] columns, nested data, and a chosen output; no id given, none answered.
    nested = {"inputs": _columns(ROWS, (1,)), "outputs": [{"name": "label"}]}
    body = _infer(mixed, nested).json()
    assert "id" not in body
    assert body["outputs"] == [
        {
            "name": "label",
            "datatype": "INT64",
            "shape": [2, 1],
            "data": [row["label"] for row in expected],
        }
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["inputs"][0].update(datatype="BYTES", data=["x", "y"]), "datatype BYTES"),
        (lambda r: r["inputs"][0].update(datatype="FLOAT"), "datatype must be one of"),
        (
            lambda r: r["inputs"][3].update(datatype="INT8", data=[5, 600]),
            "does not match datatype INT8",
        ),
        (lambda r: r["inputs"][4].update(data=[1, 0]), "does not match datatype BOOL"),
        (lambda r: r["inputs"][0].update(shape=[3]), "holds 3 value(s), data has 2"),
        (lambda r: r["inputs"][0].update(shape=[1, 2]), "shape is [N] or [N, 1]"),
        (lambda r: r["inputs"][0].update(shape=[-1]), "non-negative integers"),
        (lambda r: r["inputs"][0].update(name="secret-name"), "unknown input"),
        (lambda r: r["inputs"].pop(), "missing input(s) ['s']"),
        (lambda r: r["inputs"].append(dict(r["inputs"][0])), "given twice"),
        (lambda r: r["inputs"][1].update(shape=[1], data=[0.5]), "different numbers of rows"),
        (lambda r: r.update(outputs=[{"name": "secret-output"}]), "unknown output"),
        (lambda r: r.update(parameters=[1]), "parameters must be a JSON object"),
        (lambda r: r.update(id=7), "id must be a string"),
        (lambda r: r.update(inputs=[]), "inputs is empty"),
        (lambda r: r.pop("inputs"), '{"inputs": [...], ...}'),
    ],
)
def test_infer_errors(mixed: ServerProcess, change: Any, message: str) -> None:
    request: dict[str, Any] = {"inputs": _columns(ROWS)}
    change(request)
    answer = _infer(mixed, request)
    assert answer.status == 400, answer.body
    body = answer.json()
    assert body["error_code"] == "BAD_REQUEST"
    assert message in body["error"]
    assert body["error"] == body["message"]
    assert "secret" not in answer.body.decode()


def test_infer_malformed_and_mlflow_errors(mixed: ServerProcess) -> None:
    assert _infer(mixed, "{not json").json()["error"] == "the body is not valid JSON"
    wrong_type = mixed.request("POST", INFER, "{}", {"Content-Type": "text/csv"})
    assert wrong_type.status == 415
    assert mixed.request("GET", INFER).status == 405
    # The kind matches (integer), the values do not fit the model's INT32 column (MLflow's
    # schema enforcement would wrap them around).
    request: dict[str, Any] = {"inputs": _columns(ROWS)}
    request["inputs"][3].update(datatype="INT64", data=[2**40 + 7, 6])
    answer = _infer(mixed, request)
    assert answer.status == 400, answer.body
    assert answer.json()["error"] == "input 'i': values out of the range of INT32"
    # A parameter of the wrong type: MLflow's params enforcement answers, in the
    # protocol's error shape, without the value.
    request = {"inputs": _columns(ROWS), "parameters": {"scale": "secret-scale"}}
    answer = _infer(mixed, request)
    assert answer.status == 400, answer.body
    assert answer.json()["error"] == answer.json()["message"]
    assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "secret" not in answer.body.decode()


def test_tensor_model(tensor: ServerProcess) -> None:
    meta = tensor.request("GET", "/v2/models/rowsums").json()
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": [-1]}]
    rows = [[1.0, 2.0, 3.5], [4.0, 5.0, 6.0], [0.5, 0.0, -1.0]]
    expected = tensor.invoke({"inputs": rows, "params": {"scale": 3.0}}).json()["predictions"]
    for data in (rows, [v for row in rows for v in row]):  # nested or flat, row-major
        request = {
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [3, 3], "data": data}],
            "parameters": {"scale": 3.0},
        }
        answer = _infer(tensor, request, "/v2/models/rowsums/infer")
        assert answer.status == 200, answer.body
        (output,) = answer.json()["outputs"]
        assert output["name"] == "output-0"
        assert output["shape"] == [3]
        assert output["data"] == expected
    bad_shape = {
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [4, 2], "data": [0] * 8}]
    }
    answer = _infer(tensor, bad_shape, "/v2/models/rowsums/infer")
    assert answer.status == 400
    assert "does not fit the model's [-1, 3]" in answer.json()["error"]


# -- Differential: MLServer with its MLflow runtime ----------------------------------------
# MLServer is what MLflow ships for KServe (`mlflow models build-docker --enable-mlserver`).
# It goes into a throwaway venv per session, with this environment's MLflow, pandas and
# numpy, so that both servers load each model the same way.
MLSERVER = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1")
# Where MLServer's status is not the protocol's (200 for a valid request, 400 for an invalid
# one; ours are): its MLflow runtime cannot encode a list of predictions (a pyfunc's most
# common answer) nor a DataFrame with a string column, its decoding and MLflow's schema
# errors escape as 500s, and FastAPI's validation answers 422 (echoing the request).
MLSERVER_DIFFERS = {
    ("sleepy", "one column"): (500, "list predictions: mlserver_mlflow's codec wants a dict"),
    ("sleepy", "[N, 1] column"): (500, "list predictions"),
    ("sleepy", "params"): (500, "list predictions"),
    ("sleepy", "data short of the shape"): (500, "numpy's reshape error escapes"),
    ("sleepy", "strings for a double column"): (500, "MLflow's schema error escapes"),
    ("sleepy", "unknown input"): (500, "MLflow's schema error escapes"),
    ("sleepy", "no inputs"): (422, "FastAPI's validation status"),
    ("sleepy", "not JSON"): (422, "FastAPI's validation status"),
    ("mixed", "every column"): (500, "a DataFrame with a string column: no datatype for 'O'"),
    ("frame", "missing column"): (500, "MLflow's schema error escapes"),
    ("rowsums", "data short of the shape"): (500, "numpy's reshape error escapes"),
}


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


CORPUS: list[tuple[str, str, Any, bool]] = [  # model, case, request, valid
    ("sleepy", "one column", {"inputs": [_tensor("x", "FP64", [2], [1.5, -2.0])]}, True),
    ("sleepy", "[N, 1] column", {"inputs": [_tensor("x", "FP64", [2, 1], [1.5, 2.0])]}, True),
    (
        "sleepy",
        "params",
        {"inputs": [_tensor("x", "FP64", [1], [4.0])], "parameters": {"sleep": 0.0}},
        True,
    ),
    ("sleepy", "data short of the shape", {"inputs": [_tensor("x", "FP64", [3], [1.0])]}, False),
    (
        "sleepy",
        "strings for a double column",
        {"inputs": [_tensor("x", "BYTES", [2], ["a", "b"])]},
        False,
    ),
    ("sleepy", "unknown input", {"inputs": [_tensor("zz", "FP64", [1], [1.0])]}, False),
    ("sleepy", "no inputs", {"id": "x"}, False),
    ("sleepy", "not JSON", "{not json", False),
    ("mixed", "every column", {"inputs": _columns(ROWS)}, True),
    (
        "frame",
        "two columns",
        {"inputs": [_tensor("a", "FP64", [2], [1.5, -1.0]), _tensor("b", "INT64", [2], [3, 9])]},
        True,
    ),
    ("frame", "missing column", {"inputs": [_tensor("a", "FP64", [1], [1.5])]}, False),
    (
        "rowsums",
        "flat rows",
        {"inputs": [_tensor("input-0", "FP32", [2, 3], [1, 2, 3, 4, 5, 6.5])]},
        True,
    ),
    (
        "rowsums",
        "nested rows, params",
        {
            "inputs": [_tensor("input-0", "FP32", [1, 3], [[1.0, 2.0, 3.0]])],
            "parameters": {"scale": 2.0},
        },
        True,
    ),
    (
        "rowsums",
        "data short of the shape",
        {"inputs": [_tensor("input-0", "FP32", [2, 3], [1.0, 2.0])]},
        False,
    ),
]


@pytest.fixture(scope="session")
def mlserver_command(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    venv = tmp_path_factory.mktemp("mlserver") / "venv"
    pins = [f"{name}=={version(name)}" for name in ("mlflow", "pandas", "numpy")]
    try:
        subprocess.run(
            [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                str(venv / "bin" / "python"),
                *MLSERVER,
                *pins,
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as err:
        unavailable(f"MLServer could not be installed into a throwaway venv from PyPI: {err}")
    return venv / "bin" / "mlserver"


@pytest.fixture(scope="module")
def mlserver(
    mlserver_command: Path,
    server_models: Path,
    extra_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """``mlserver start`` serving the four models, one process, on loopback."""
    tmp_path = tmp_path_factory.mktemp("mlserver-run")
    models = {
        "sleepy": server_models / "sleepy",
        "mixed": server_models / "mixed",
        "frame": extra_models / "frame",
        "rowsums": extra_models / "rowsums",
    }
    root = tmp_path / "mlserver"
    for name, path in models.items():
        (root / name).mkdir(parents=True)
        settings = {
            "name": name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": str(path)},
        }
        (root / name / "model-settings.json").write_text(json.dumps(settings))
    port = free_port()
    env = {
        **os.environ,
        "MLSERVER_HOST": "127.0.0.1",
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
        "MLSERVER_PARALLEL_WORKERS": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = tmp_path / "mlserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(mlserver_command), "start", str(root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = ServerProcess(process=process, port=port, log_dir=tmp_path, env=env)
    try:
        for name in models:
            wait_for_http(f"{server.url}/v2/models/{name}/ready", 180, process, log)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def ours(
    server_models: Path,
    extra_models: Path,
    mixed: ServerProcess,
    tensor: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, ServerProcess]]:
    log_dir = tmp_path_factory.mktemp("v2-ours")
    with (
        run_server(server_models / "sleepy", log_dir / "sleepy", "--workers", "1") as sleepy,
        run_server(extra_models / "frame", log_dir / "frame", "--workers", "1") as frame,
    ):
        yield {"sleepy": sleepy, "mixed": mixed, "frame": frame, "rowsums": tensor}


def test_metadata_like_mlserver(mlserver: ServerProcess, ours: dict[str, ServerProcess]) -> None:
    """The same tensors: names, datatypes and shapes (MLServer's optional ``parameters``
    aside)."""
    for name, server in ours.items():
        mine = server.request("GET", f"/v2/models/{name}").json()
        theirs = mlserver.request("GET", f"/v2/models/{name}").json()
        for key in ("inputs", "outputs"):
            assert mine[key] == [
                {k: t[k] for k in ("name", "datatype", "shape")} for t in theirs[key]
            ], (name, key)


def test_infer_like_mlserver(mlserver: ServerProcess, ours: dict[str, ServerProcess]) -> None:
    """The corpus on both: where MLServer answers 200, the same datatypes and values in
    the same order (its output names and shapes for an unnamed one-dimensional output are
    output-1 and [N, 1], against its own metadata's output-0 and [-1]: ours follow the
    metadata); other statuses the same, but for the documented cases where MLServer's is
    not the protocol's."""
    differs: dict[tuple[str, str], int] = {}
    for model, case, request, valid in CORPUS:
        path = f"/v2/models/{model}/infer"
        mine, theirs = _infer(ours[model], request, path), _infer(mlserver, request, path)
        assert mine.status == (200 if valid else 400), (model, case, mine.body)
        if theirs.status != mine.status:
            differs[model, case] = theirs.status
        elif theirs.status == 200:
            mine_outputs, their_outputs = mine.json()["outputs"], theirs.json()["outputs"]
            assert [(o["datatype"], o["data"]) for o in mine_outputs] == [
                (o["datatype"], list(_flatten(o["data"]))) for o in their_outputs
            ], (model, case)
            if model != "rowsums":  # see the docstring
                assert [(o["name"], o["shape"]) for o in mine_outputs] == [
                    (o["name"], o["shape"]) for o in their_outputs
                ], (model, case)
    assert differs == {key: status for key, (status, _) in MLSERVER_DIFFERS.items()}


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data
