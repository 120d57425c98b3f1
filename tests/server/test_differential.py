"""Differential tests: `mlflow models serve` and packager_server side by side.

For each test model, both servers run on the same model directory in this environment
and receive the same corpus of requests: every input format, batches, reordered, missing
and extra columns, wrong types, nulls, params, malformed bodies and content types. They
must give the same status code, the same predictions, and the same error_code.

Known, documented improvements over MLflow are not in this corpus but in
test_server_process.py: MLflow answers a missing Content-Type, JSON nested too deeply and
over-long integers with 500; we answer 415/400.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager.api import inspect_model
from packager.source import RegistryOptions
from tests.conftest import MlflowServer, free_port, wait_for_http
from tests.server.conftest import ServerProcess, run_server

pytestmark = [pytest.mark.slow, pytest.mark.mlflow_server]

Request = tuple[str, str, bytes]  # name, content type, body
JSON = "application/json"


@contextlib.contextmanager
def mlflow_serve(model_dir: Path, log_dir: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "mlflow-serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "serve",
                "-m",
                str(model_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
                "--env-manager",
                "local",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow starts `uvicorn` through bash: this environment's bin must be on PATH.
            env={
                **os.environ,
                **env,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            },
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", 180, process, log)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def corpus(model_dir: Path) -> list[Request]:
    """Requests derived from the model's serving example and signature."""
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    split = example["dataframe_split"]
    columns, rows = split["columns"], split["data"]
    params = example.get("params")
    records = [dict(zip(columns, row, strict=True)) for row in rows]

    def body(data: Any, with_params: bool = True) -> bytes:
        if with_params and params is not None and isinstance(data, dict):
            data = {**data, "params": params}
        return json.dumps(data).encode()

    first = columns[0]
    numeric = isinstance(rows[0][0], (int, float)) and not isinstance(rows[0][0], bool)
    wrong = "not-a-number" if numeric else 12345
    reordered = list(reversed(columns))
    requests: list[Request] = [
        ("example", JSON, body(example, with_params=False)),
        ("split", JSON, body({"dataframe_split": {"columns": columns, "data": rows}})),
        ("records", JSON, body({"dataframe_records": records})),
        ("batch", JSON, body({"dataframe_split": {"columns": columns, "data": rows * 7}})),
        (
            "reordered",
            JSON,
            body(
                {
                    "dataframe_split": {
                        "columns": reordered,
                        "data": [[r[columns.index(c)] for c in reordered] for r in rows],
                    }
                }
            ),
        ),
        (
            "index",
            JSON,
            body(
                {
                    "dataframe_split": {
                        "columns": columns,
                        "data": rows,
                        "index": list(range(10, 10 + len(rows))),
                    }
                }
            ),
        ),
        ("instances", JSON, body({"instances": records})),
        (
            "inputs",
            JSON,
            body({"inputs": {c: [r[i] for r in rows] for i, c in enumerate(columns)}}),
        ),
        ("charset", f"{JSON}; charset=UTF-8", body({"dataframe_records": records})),
        (
            "missing-column",
            JSON,
            body(
                {"dataframe_records": [{k: v for k, v in r.items() if k != first} for r in records]}
            ),
        ),
        (
            "extra-column",
            JSON,
            body({"dataframe_records": [{**r, "zz_extra": 1} for r in records]}),
        ),
        ("wrong-type", JSON, body({"dataframe_records": [{**records[0], first: wrong}]})),
        ("null", JSON, body({"dataframe_records": [{**records[0], first: None}]})),
        ("empty", JSON, body({"dataframe_split": {"columns": columns, "data": []}})),
        (
            "int-for-float",
            JSON,
            body(
                {
                    "dataframe_records": [
                        {k: (round(v) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in records
                    ]
                }
            ),
        ),
        ("malformed", JSON, b'{"dataframe_split": {'),
        ("top-level-list", JSON, json.dumps(records).encode()),
        (
            "two-formats",
            JSON,
            json.dumps({"dataframe_records": records, "instances": records}).encode(),
        ),
        ("unknown-key", JSON, b'{"rows": [1, 2]}'),
        ("not-an-object", JSON, b'"just a string"'),
        ("llm-keys", JSON, b'{"messages": [{"role": "user", "content": "hi"}]}'),
        ("text-plain", "text/plain", b"hello"),
        ("latin1", f"{JSON}; charset=latin-1", body({"dataframe_records": records})),
        ("bad-param", f"{JSON}; foo=bar", body({"dataframe_records": records})),
        ("csv", "text/csv", _csv(columns, rows)),
        ("csv-missing", "text/csv", _csv(columns[1:], [r[1:] for r in rows])),
        ("parquet", "application/vnd.apache.parquet", _parquet(columns, rows)),
        ("parquet-garbage", "application/vnd.apache.parquet", b"PAR1 not parquet"),
    ]
    if params is not None:
        name, default = next(iter(params.items()))
        requests += [
            (
                "params-valid",
                JSON,
                json.dumps({"dataframe_records": records, "params": params}).encode(),
            ),
            (
                "params-wrong-type",
                JSON,
                json.dumps(
                    {
                        "dataframe_records": records,
                        "params": {name: "x" if not isinstance(default, str) else 5},
                    }
                ).encode(),
            ),
            (
                "params-unknown",
                JSON,
                json.dumps({"dataframe_records": records, "params": {"nope": 1}}).encode(),
            ),
            (
                "params-not-dict",
                JSON,
                json.dumps({"dataframe_records": records, "params": [1, 2]}).encode(),
            ),
        ]
    return requests


def _csv(columns: list[str], rows: list[list[Any]]) -> bytes:
    import pandas as pd

    return bytes(pd.DataFrame(rows, columns=columns).to_csv(index=False).encode())


def _parquet(columns: list[str], rows: list[list[Any]]) -> bytes:
    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame(rows, columns=columns).to_parquet(buffer)
    return buffer.getvalue()


def _post(target: str, content_type: str, body: bytes) -> tuple[int, bytes]:
    import http.client

    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def compare(model_dir: Path, ours: ServerProcess, theirs: str) -> list[str]:
    """Send the corpus to both servers; return the differences (empty when equal)."""
    differences = []
    statuses = {}
    for name, content_type, body in corpus(model_dir):
        expected_status, expected = _post(theirs, content_type, body)
        answer = ours.invoke(body, content_type=content_type)
        statuses[name] = expected_status
        ours_body = answer.json()  # always JSON, whatever the status
        if answer.status != expected_status:
            differences.append(
                f"{name}: status {answer.status} != mlflow {expected_status} "
                f"({ours_body} / {expected[:300]!r})"
            )
            continue
        try:
            reference = json.loads(expected)
        except ValueError:
            assert expected_status == 415, (name, expected[:200])  # MLflow's plain-text 415
            assert ours_body["error_code"] == "BAD_REQUEST"
            continue
        if expected_status == 200:
            if ours_body != reference:
                differences.append(f"{name}: predictions differ: {ours_body} != {reference}")
        elif ours_body.get("error_code") != reference.get("error_code"):
            differences.append(f"{name}: error_code {ours_body} != {reference.get('error_code')}")
    # The corpus must exercise both successes and failures.
    assert sum(s == 200 for s in statuses.values()) >= 4, statuses
    assert sum(s >= 400 for s in statuses.values()) >= 8, statuses
    return differences


@pytest.fixture(scope="module")
def registry_models(
    registered_models: dict[str, Any],
    mlflow_server: MlflowServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    cache_dir = tmp_path_factory.mktemp("diff-cache")
    from packager.cache import ModelCache

    paths = {}
    for reference in (
        "models:/sk-cloudpickle/1",
        "models:/sk-skops/1",
        "models:/pyfunc-code/1",
        "models:/params-model/1",
        "models:/private-wheel/2",
    ):
        result = inspect_model(
            reference,
            options=RegistryOptions(tracking_uri=mlflow_server.uri),
            cache=ModelCache(cache_dir),
        )
        paths[reference] = result.spec.path
    return paths


@pytest.mark.parametrize(
    "reference",
    [
        "models:/sk-cloudpickle/1",
        "models:/sk-skops/1",
        "models:/pyfunc-code/1",
        "models:/params-model/1",
        "models:/private-wheel/2",
        "local:strings",
        "local:mixed",
    ],
)
def test_same_answers_as_mlflow(
    reference: str, registry_models: dict[str, Path], server_models: Path, tmp_path: Path
) -> None:
    if reference.startswith("local:"):
        model_dir = server_models / reference.split(":", 1)[1]
    else:
        model_dir = registry_models[reference]
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    wheels = sorted((model_dir / "wheels").glob("acme_featurizer-*.whl"))
    if wheels:  # the private package exists on no index: import it from its wheel
        env["PYTHONPATH"] = os.pathsep.join([str(wheels[0]), os.environ.get("PYTHONPATH", "")])
    with (
        mlflow_serve(model_dir, tmp_path / "mlflow", env) as theirs,
        run_server(model_dir, tmp_path / "ours", "--workers", "1", env=env) as ours,
    ):
        differences = compare(model_dir, ours, theirs)
    assert differences == []
