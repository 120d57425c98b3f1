"""The cloud platforms' conventions (issue 14), each with the server started the way the
platform starts it: the command line and environment it gives, no ``--port``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager_server import platforms
from packager_server.config import ConfigError, load_config
from packager_server.metrics import route_label
from packager_server.scoring import Answer
from tests.conftest import free_port, wait_for_http
from tests.server.conftest import ServerProcess, server_process

pytestmark = pytest.mark.slow

# Variables a platform may set: none leaks into a test from the machine's environment.
_PLATFORM_VARIABLES = (
    "PORT",
    "PACKAGER_PORT",
    "AIP_HTTP_PORT",
    "AIP_HEALTH_ROUTE",
    "AIP_PREDICT_ROUTE",
    "SAGEMAKER_BIND_TO_PORT",
    "SAGEMAKER_MODEL_SERVER_WORKERS",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT",
    "PACKAGER_WORKERS",
)
MIXED_ROWS = [
    {"d": 1.5, "f": 0.5, "l": 3, "i": 5, "b": True, "s": "a"},
    {"d": -2.0, "f": 1.0, "l": 4, "i": 6, "b": False, "s": "bcd"},
]
COLUMNS = ["d", "f", "l", "i", "b", "s"]


@contextlib.contextmanager
def platform_server(
    model_dir: Path, log_dir: Path, argv: list[str], env: dict[str, str], port: int
) -> Iterator[ServerProcess]:
    """``python -m packager_server ARGV`` as the platform runs it: the model and the port
    come from ``env`` only. SIGTERM (then SIGKILL) on exit."""
    base = {k: v for k, v in os.environ.items() if k not in _PLATFORM_VARIABLES}
    full_env = {
        **base,
        "PACKAGER_MODEL_DIR": str(model_dir),
        "PACKAGER_HOST": "127.0.0.1",
        "PACKAGER_WORKERS": "1",
        **env,
    }
    with server_process(argv, full_env, port, log_dir) as server:
        wait_for_http(f"{server.url}/live", 120, server.process, log_dir / "stderr.log")
        wait_for_http(f"{server.url}/ready", 120, server.process, log_dir / "stderr.log")
        yield server


def _post(server: ServerProcess, path: str, body: Any, content_type: str, **headers: str) -> Any:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return server.request("POST", path, data, {"Content-Type": content_type, **headers})


# -- configuration (no process) ------------------------------------------------------------


def test_port_precedence(tmp_path: Path) -> None:
    model = {"PACKAGER_MODEL_DIR": str(tmp_path)}
    chain = [
        ("SAGEMAKER_BIND_TO_PORT", "9001"),
        ("AIP_HTTP_PORT", "9002"),
        ("PORT", "9003"),
        ("PACKAGER_PORT", "9004"),
    ]
    # Each variable wins over every one after it; the flag over all; 8080 without any.
    for index, (_, port) in enumerate(chain):
        env = {**model, **dict(chain[index:])}
        assert load_config([], env).port == int(port)
        assert load_config(["--port", "9100"], env).port == 9100
    assert load_config([], model).port == 8080
    assert load_config(["serve"], model).port == 8080
    with pytest.raises(ConfigError, match="port"):
        load_config([], {**model, "AIP_HTTP_PORT": "http"})


def test_sagemaker_and_vertex_settings(tmp_path: Path) -> None:
    env = {
        "PACKAGER_MODEL_DIR": str(tmp_path),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "9",
        "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
    }
    config = load_config(["serve"], env)
    assert (config.workers, config.timeout) == (3, 9.0)
    assert config.health_route == env["AIP_HEALTH_ROUTE"]
    assert config.predict_route == env["AIP_PREDICT_ROUTE"]
    # Ours come first.
    config = load_config([], {**env, "PACKAGER_WORKERS": "2", "PACKAGER_TIMEOUT": "4"})
    assert (config.workers, config.timeout) == (2, 4.0)
    for bad in ("predict", "/a b", "/p?x=1", "/\x7f"):
        with pytest.raises(ConfigError, match="AIP_PREDICT_ROUTE"):
            load_config([], {**env, "AIP_PREDICT_ROUTE": bad})
    with pytest.raises(SystemExit):  # argparse: only SageMaker's command is known
        load_config(["train"], env)


@pytest.mark.parametrize(
    ("predictions", "csv_text"),
    [
        ([2.0, -5.0], "2.0\n-5.0\n"),  # one scalar a line
        ([[1, "a,b"], [2, None]], '1,"a,b"\n2,\n'),  # a list's values; RFC 4180 quoting
        ([{"total": 1.5, "label": "x"}], "1.5,x\n"),  # a DataFrame's records, in order
        ({"a": [1, 2], "b": [True, False]}, "1,True\n2,False\n"),  # named outputs side by side
    ],
)
def test_csv_answers_are_rows(predictions: Any, csv_text: str) -> None:
    body = json.dumps({"predictions": predictions}).encode()
    invoke = platforms.csv_output(lambda _body, _type: Answer(status=200, body=body))
    answer = invoke(b"", None)
    assert (answer.status, answer.content_type, answer.body.decode()) == (200, "text/csv", csv_text)


def test_csv_answers_refuse_what_is_not_a_table_and_keep_errors() -> None:
    nested = json.dumps({"predictions": [[[1, 2]]]}).encode()
    answer = platforms.csv_output(lambda _b, _t: Answer(status=200, body=nested))(b"", None)
    assert answer.status == 406
    assert "application/json" in json.loads(answer.body)["message"]
    error = Answer(status=400, body=b'{"error_code": "BAD_REQUEST", "message": "m"}')
    assert platforms.csv_output(lambda _b, _t: error)(b"", None) is error
    assert platforms.wants_csv("text/csv")
    assert platforms.wants_csv("text/csv, application/json;q=0.5")
    assert not platforms.wants_csv("application/json, text/csv")
    assert not platforms.wants_csv(None)


def test_route_labels_are_a_fixed_few() -> None:
    routes = {"predict_route": "/v1/e/1:predict", "health_route": "/v1/e/1"}
    assert route_label("/v1/e/1:predict", **routes) == "AIP_PREDICT_ROUTE"
    assert route_label("/v1/e/1", **routes) == "AIP_HEALTH_ROUTE"
    assert route_label("/readyz") == "/readyz"
    assert route_label("/v2/models/wine/versions/3/infer") == "/v2/models/{name}/infer"
    assert route_label("/v2/models/wine") == "/v2/models/{name}"
    assert route_label("/v2/models/wine/a/b") == "other"
    assert route_label("/v1/e/1:predict") == "other"  # not Vertex's route here


# -- Cloud Run, Azure ML: PORT ---------------------------------------------------------------


def test_port_variable_is_where_it_serves(server_models: Path, tmp_path: Path) -> None:
    port = free_port()
    # The image sets PACKAGER_PORT=8080; the platform's PORT must win over it.
    env = {"PORT": str(port), "PACKAGER_PORT": str(free_port())}
    with platform_server(server_models / "sleepy", tmp_path, [], env, port) as server:
        one_row = {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}
        assert server.invoke(one_row).json() == {"predictions": [3.0]}
        # The image's HEALTHCHECK command probes the port the server chose, not 8080.
        health = [sys.executable, "-m", "packager_server.health"]
        checked = subprocess.run(health, env={**os.environ, **env}, check=False, timeout=30)
        assert checked.returncode == 0
        elsewhere = {**os.environ, **env, "PORT": str(free_port())}
        assert subprocess.run(health, env=elsewhere, check=False, timeout=30).returncode == 1


# -- Vertex AI custom containers ---------------------------------------------------------


@pytest.fixture(scope="module")
def vertex(
    server_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    port = free_port()
    env = {
        "AIP_HTTP_PORT": str(port),
        "PORT": str(free_port()),  # Vertex's own variable comes first
        "AIP_HEALTH_ROUTE": "/v1/endpoints/7/deployedModels/8",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/7/deployedModels/8:predict",
    }
    log_dir = tmp_path_factory.mktemp("vertex")
    with platform_server(server_models / "mixed", log_dir, [], env, port) as server:
        yield server


def test_vertex_health_route(vertex: ServerProcess) -> None:
    health = vertex.request("GET", "/v1/endpoints/7/deployedModels/8")
    assert (health.status, health.body) == (200, b"\n")


def test_vertex_instances_answer_predictions(vertex: ServerProcess) -> None:
    route = "/v1/endpoints/7/deployedModels/8:predict"
    expected = vertex.invoke({"dataframe_records": MIXED_ROWS, "params": {"scale": 2.0}}).json()
    answer = _post(
        vertex, route, {"instances": MIXED_ROWS, "parameters": {"scale": 2.0}}, "application/json"
    )
    assert answer.status == 200, answer.body
    assert answer.json() == expected
    assert [p["total"] for p in answer.json()["predictions"]] != [
        p["total"] for p in vertex.invoke({"dataframe_records": MIXED_ROWS}).json()["predictions"]
    ], "parameters were not passed to the model"
    for bad, message in (
        ({"rows": MIXED_ROWS}, "instances"),
        ({"instances": MIXED_ROWS, "extra": 1}, "unknown field"),
        ({"instances": MIXED_ROWS, "parameters": [1]}, "parameters"),
        ("{not json", "not valid JSON"),
    ):
        refused = _post(vertex, route, bad, "application/json")
        assert refused.status == 400, bad
        assert message in refused.json()["message"]
    # A wrong column type is MLflow's schema error, cleaned like /invocations' errors.
    wrong = _post(
        vertex, route, {"instances": [{**MIXED_ROWS[0], "l": "many"}]}, "application/json"
    )
    assert wrong.status == 400
    assert wrong.json()["error_code"] == "BAD_REQUEST"
    assert "many" not in wrong.body.decode()


# -- SageMaker -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sagemaker(
    server_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """``docker run IMAGE serve``: the entrypoint gets the one argument ``serve``."""
    port = free_port()
    env = {
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_SAFE_PORT_RANGE": "20000-20999",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "PACKAGER_PORT": "8080",  # as the image sets it
    }
    env_without_ours = {"PACKAGER_WORKERS": ""}  # SageMaker's variable decides
    log_dir = tmp_path_factory.mktemp("sagemaker")
    with platform_server(
        server_models / "mixed", log_dir, ["serve"], {**env, **env_without_ours}, port
    ) as server:
        yield server


def test_sagemaker_serve_ping_and_invocations(sagemaker: ServerProcess) -> None:
    assert sagemaker.request("GET", "/ping").status == 200
    answer = sagemaker.invoke({"dataframe_records": MIXED_ROWS})
    assert answer.status == 200
    assert len(answer.json()["predictions"]) == 2
    params = sagemaker.request("GET", "/execution-parameters").json()
    assert params["MaxConcurrentTransforms"] == 2
    assert params["BatchStrategy"] == "MULTI_RECORD"
    assert params["MaxPayloadInMB"] == 16


def test_batch_transform_json_lines(sagemaker: ServerProcess) -> None:
    expected = sagemaker.invoke({"dataframe_records": MIXED_ROWS}).json()["predictions"]
    objects = "".join(json.dumps(row) + "\n" for row in MIXED_ROWS)
    arrays = "\n".join(json.dumps([row[c] for c in COLUMNS]) for row in MIXED_ROWS)
    for body in (objects, arrays, "\n" + objects + "\n\n"):
        answer = _post(sagemaker, "/invocations", body, "application/jsonlines")
        assert answer.status == 200, answer.body
        assert answer.headers["content-type"] == "application/jsonlines"
        lines = answer.body.decode().splitlines()
        assert [json.loads(line) for line in lines] == expected
    # Accept: application/json gives MLflow's answer.
    answer = _post(
        sagemaker, "/invocations", objects, "application/jsonlines", Accept="application/json"
    )
    assert answer.json() == {"predictions": expected}
    for bad, message in (
        (objects + "{broken\n", "line 3 is not valid JSON"),
        (objects + arrays, "all JSON objects or all JSON arrays"),
        ("1\n", "line 1: a row is a JSON object or array"),
        ("\n", "no JSON lines"),
    ):
        refused = _post(sagemaker, "/invocations", bad, "application/jsonlines")
        assert refused.status == 400
        assert message in refused.json()["message"]


def test_batch_transform_csv_without_header(sagemaker: ServerProcess) -> None:
    rows = [[str(row[c]).lower() for c in COLUMNS] for row in MIXED_ROWS]
    header = ",".join(COLUMNS) + "\n"
    body = "".join(",".join(row) + "\n" for row in rows)
    with_header = sagemaker.invoke(header + body, "text/csv")
    assert with_header.status == 200
    answer = sagemaker.invoke(body, "text/csv; header=absent")
    assert answer.status == 200, answer.body
    assert answer.json() == with_header.json()
    lines = sagemaker.request(
        "POST",
        "/invocations",
        body,
        {"Content-Type": "text/csv;header=absent", "Accept": "application/jsonlines"},
    )
    assert [json.loads(line) for line in lines.body.decode().splitlines()] == (
        with_header.json()["predictions"]
    )
    # Plain text/csv keeps MLflow's meaning: the first line is the header.
    assert sagemaker.invoke(body, "text/csv").status == 400


def test_batch_transform_accept_csv(sagemaker: ServerProcess) -> None:
    """The transform job's ``Accept: text/csv``: one CSV row a record, no header, so
    ``JoinSource: Input`` can append each to its input line."""
    objects = "".join(json.dumps(row) + "\n" for row in MIXED_ROWS)
    csv_rows = "".join(",".join(str(r[c]).lower() for c in COLUMNS) + "\n" for r in MIXED_ROWS)
    for body, content_type in (
        (json.dumps({"dataframe_records": MIXED_ROWS}), "application/json"),
        (objects, "application/jsonlines"),
        (csv_rows, "text/csv; header=absent"),
    ):
        as_json = _post(sagemaker, "/invocations", body, content_type, Accept="application/json")
        out = io.StringIO()
        records = as_json.json()["predictions"]
        csv.writer(out, lineterminator="\n").writerows(list(p.values()) for p in records)
        assert '"float64,float32' in out.getvalue()  # a value with commas is quoted
        answer = _post(sagemaker, "/invocations", body, content_type, Accept="text/csv")
        assert answer.status == 200, (content_type, answer.body)
        assert answer.headers["content-type"] == "text/csv"
        assert answer.body.decode() == out.getvalue()
    # Errors stay JSON, and so do the answers of clients that ask for no CSV.
    refused = _post(sagemaker, "/invocations", "{oops", "application/json", Accept="text/csv")
    assert refused.status == 400
    assert refused.json()["error_code"] == "BAD_REQUEST"
    assert sagemaker.request("GET", "/execution-parameters").status == 200
    metrics = sagemaker.request("GET", "/metrics").body.decode()
    assert 'path="/execution-parameters",status="200"}' in metrics
