"""packager_server as a real process: probes, timeouts, limits, shutdown, logs, metrics."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from packager_server.config import ConfigError, load_config
from tests.server.conftest import Response, run_server

pytestmark = pytest.mark.slow

ONE_ROW = {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def test_alive_while_loading_ready_after(server_models: Path, tmp_path: Path) -> None:
    env = {"SLEEPY_LOAD_SECONDS": "4"}
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", env=env, wait_ready=False
    ) as server:
        deadline = time.monotonic() + 60
        seen_loading = False
        while time.monotonic() < deadline:
            try:
                live, _ = _get(f"{server.url}/live")
            except OSError:
                time.sleep(0.1)
                continue
            ready, body = _get(f"{server.url}/ready")
            if ready == 503:
                assert live == 200
                assert json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE"
                ping, _ = _get(f"{server.url}/ping")
                if ping == 503:
                    seen_loading = True
                else:
                    # Loading may finish between the two probes; then the server must
                    # say ready from now on, never flip back.
                    assert ping == 200
                    assert _get(f"{server.url}/ready")[0] == 200
                    break
            elif ready == 200:
                break
            time.sleep(0.1)
        assert seen_loading, "never observed the loading state"
        assert _get(f"{server.url}/ping") == (200, b"\n")
        assert _get(f"{server.url}/health") == (200, b"\n")
        assert server.invoke(ONE_ROW).json() == {"predictions": [3.0]}


def test_timeout_answers_504_and_replaces_the_worker(server_models: Path, tmp_path: Path) -> None:
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", "--timeout", "1"
    ) as server:
        started = time.monotonic()
        slow = server.invoke({**ONE_ROW, "params": {"sleep": 30.0}})
        assert slow.status == 504
        assert slow.json()["error_code"] == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 10
        # The worker retires and a fresh one (forked from the loaded model) takes over.
        deadline = time.monotonic() + 30
        answer: Response | None = None
        while time.monotonic() < deadline:
            try:
                answer = server.invoke(ONE_ROW, timeout=5)
                if answer.status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert answer is not None
        assert answer.status == 200
        assert answer.json() == {"predictions": [3.0]}
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'packager_worker_restarts_total{model="sleepy",version=""} 1' in metrics
    assert "retired after a request timeout" in server.stderr()


def test_a_worker_stuck_in_c_code_is_answered_for_and_replaced(
    server_models: Path, tmp_path: Path
) -> None:
    """SIGALRM cannot interrupt C code that never returns (this one releases the GIL; see
    test_takeover.py for code that holds it): the supervisor answers the 504 and replaces
    the worker."""
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", "--timeout", "1"
    ) as server:
        started = time.monotonic()
        stuck = server.invoke({**ONE_ROW, "params": {"hang": True}}, timeout=60)
        assert stuck.status == 504
        assert stuck.json()["error_code"] == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if server.invoke(ONE_ROW, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert server.invoke(ONE_ROW).json() == {"predictions": [3.0]}
    assert "has been predicting for over" in server.stderr()


def test_sigterm_finishes_in_flight_requests_then_exits_0(
    server_models: Path, tmp_path: Path
) -> None:
    with run_server(server_models / "sleepy", tmp_path, "--workers", "2") as server:
        results: dict[str, Any] = {}

        def slow_request() -> None:
            results["answer"] = server.invoke({**ONE_ROW, "params": {"sleep": 2.0}})

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.7)  # the request is in flight
        code = server.stop()
        thread.join(timeout=30)
        assert code == 0
        assert results["answer"].status == 200
        assert results["answer"].json() == {"predictions": [3.0]}
        with pytest.raises(ConnectionRefusedError):  # and nothing listens any more
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_payload_limit_is_enforced_before_reading(server_models: Path, tmp_path: Path) -> None:
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", "--max-payload", "1000"
    ) as server:
        big = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1.0]] * 500}})
        answer = server.invoke(big)
        assert answer.status == 413
        assert answer.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
        # Declared huge, never sent: answered at once from the header alone.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
            )
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413")
        assert server.invoke(ONE_ROW).status == 200


def test_request_ids_access_log_and_metrics(server_models: Path, tmp_path: Path) -> None:
    with run_server(
        server_models / "sleepy",
        tmp_path,
        "--workers",
        "2",
        "--log-format",
        "json",
        "--model-name",
        "sleepy",
        "--model-version",
        "7",
    ) as server:
        answer = server.request(
            "POST",
            "/invocations",
            json.dumps(ONE_ROW),
            {"Content-Type": "application/json", "X-Request-ID": "abc-123"},
        )
        assert answer.headers["x-request-id"] == "abc-123"
        # Server-Timing: the whole scoring, and the model's own predict on the fast path.
        timings = _server_timing(answer.headers["server-timing"])
        assert set(timings) == {"score", "model"}
        assert 0 < timings["model"] <= timings["score"]
        through_mlflow = server.invoke("x\n1.5\n", "text/csv")  # CSV: MLflow's own path
        assert through_mlflow.status == 200
        assert set(_server_timing(through_mlflow.headers["server-timing"])) == {"score"}
        assert "server-timing" not in server.request("GET", "/ping").headers
        generated = server.invoke(ONE_ROW).headers["x-request-id"]
        assert len(generated) == 32
        for _ in range(6):
            server.invoke(ONE_ROW)
        assert server.invoke("nope").status == 400
        assert server.request("GET", "/version").body.decode() == "3.17.2"
        metrics = server.request("GET", "/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = metrics.body.decode()
        labels = 'model="sleepy",version="7",path="/invocations"'
        assert f'packager_requests_total{{{labels},status="200"}} 9' in text
        assert f'packager_requests_total{{{labels},status="400"}} 1' in text
        assert f'packager_request_duration_seconds_count{{{labels},status="200"}} 9' in text
        assert 'packager_workers{model="sleepy",version="7"} 2' in text
    lines = [json.loads(line) for line in server.stdout().splitlines() if line.strip()]
    first = next(entry for entry in lines if entry["request_id"] == "abc-123")
    assert (first["method"], first["path"], first["status"]) == ("POST", "/invocations", 200)
    assert first["route"] == "fast"
    assert 0 < first["model_ms"] <= first["score_ms"]
    csv = next(entry for entry in lines if entry["route"] == "exact" and entry["status"] == 200)
    assert csv["model_ms"] is None
    assert csv["score_ms"] > 0
    assert {entry["worker"] for entry in lines} <= {0, 1}


def _server_timing(header: str) -> dict[str, float]:
    """``score;dur=1.2, model;dur=0.9`` as {"score": 1.2, "model": 0.9}."""
    timings = {}
    for metric in header.split(","):
        name, _, duration = metric.strip().partition(";dur=")
        timings[name] = float(duration)
    return timings


def test_errors_are_json_and_never_echo_data(server_models: Path, tmp_path: Path) -> None:
    secret = "customer-ssn-123-45-6789"
    with run_server(server_models / "strings", tmp_path, "--workers", "1") as server:
        cases = [
            (server.invoke({"dataframe_split": {"columns": ["wrong"], "data": [[secret]]}}), 400),
            (server.invoke(f'{{"dataframe_split": "{secret}"}}'), 400),
            (server.invoke(f"not json {secret}"), 400),
            (server.invoke(secret, content_type="text/plain"), 415),
            (server.invoke(ONE_ROW, content_type="application/json; charset=latin-1"), 415),
            (server.request("POST", "/invocations", secret), 415),  # no content type
            (server.request("GET", "/invocations"), 405),
            (server.request("GET", "/nowhere"), 404),
            (server.invoke("[" * 100000 + "]" * 100000), 400),  # nested too deep
            (server.invoke('{"inputs": ' + "9" * 5000 + "}"), 400),  # over-long integer
            (server.invoke(b'{"inputs": "\xff\xfe"}'), 400),  # invalid UTF-8
        ]
        for answer, status in cases:
            assert answer.status == status, answer.body
            body = answer.json()
            # MLflow's fields, never its stack trace (that needs --debug).
            assert {"error_code", "message"} <= set(body), body
            assert set(body) <= {"error_code", "message", "error_class", "sqlstate"}, body
            assert secret not in answer.body.decode("utf-8", "replace")
            assert "Traceback" not in body["message"]
        assert server.invoke(
            {"dataframe_split": {"columns": ["text"], "data": [["ok"]]}}
        ).json() == {"predictions": ["OK"]}


def test_workers_default_to_the_cgroup_limit(tmp_path: Path) -> None:
    from packager_server.cpu import available_cpus, cgroup_cpu_limit

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert available_cpus(tmp_path) <= 2
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1.0
    assert available_cpus(v1) == 1
    (tmp_path / "unlimited").mkdir()
    (tmp_path / "unlimited" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "unlimited") is None


def test_config_from_environment_and_flags(tmp_path: Path) -> None:
    env = {
        "PACKAGER_MODEL_DIR": str(tmp_path),
        "PORT": "9000",
        "MLFLOW_MODELS_WORKERS": "3",
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "7",
        "PACKAGER_LOG_FORMAT": "json",
        "PACKAGER_ACCESS_LOG": "0",
    }
    config = load_config([], env)
    assert (config.port, config.workers, config.timeout, config.log_format) == (
        9000,
        3,
        7.0,
        "json",
    )
    assert not config.access_log
    config = load_config(["--port", "9100", "--workers", "2"], {**env, "PACKAGER_PORT": "9050"})
    assert (config.port, config.workers) == (9100, 2)
    for bad in (
        {"PACKAGER_WORKERS": "zero"},
        {"PACKAGER_TIMEOUT": "-1"},
        {"PACKAGER_ACCESS_LOG": "maybe"},
        {"PORT": "70000"},
    ):
        with pytest.raises(ConfigError):
            load_config([], {**env, **bad})
    with pytest.raises(ConfigError, match="no model"):
        load_config([], {})


def test_header_timeout_from_flag_or_environment(tmp_path: Path) -> None:
    env = {"PACKAGER_MODEL_DIR": str(tmp_path)}
    assert load_config([], env).header_timeout == 5.0
    assert load_config([], {**env, "PACKAGER_HEADER_TIMEOUT": "2.5"}).header_timeout == 2.5
    flagged = load_config(["--header-timeout", "7"], {**env, "PACKAGER_HEADER_TIMEOUT": "2.5"})
    assert flagged.header_timeout == 7.0
    for bad in (["--header-timeout", "0"], ["--header-timeout", "nan"]):
        with pytest.raises(ConfigError, match="header-timeout"):
            load_config(bad, env)
    with pytest.raises(ConfigError, match="header timeout"):
        load_config([], {**env, "PACKAGER_HEADER_TIMEOUT": "-1"})


def test_mlflow_requirement_warnings_come_after_ready(server_models: Path, tmp_path: Path) -> None:
    """MLflow's load-time environment check still runs, but no longer delays readiness."""
    model = tmp_path / "model"
    shutil.copytree(server_models / "sleepy", model)
    with (model / "requirements.txt").open("a") as requirements:
        requirements.write("\nscikit-learn==0.20.0\n")
    with run_server(model, tmp_path / "logs", "--workers", "1") as server:
        deadline = time.monotonic() + 60
        while "Detected one or more mismatches" not in server.stderr():
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.2)
        log = server.stderr()
        assert "scikit-learn==0.20.0" in log
        assert log.index("loaded in") < log.index("Detected one or more mismatches")
        assert server.invoke(ONE_ROW).json() == {"predictions": [3.0]}


def test_bad_model_exits_3(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {python_function: {loader_module: x}}")
    with run_server(tmp_path / "model", tmp_path / "logs", wait_ready=False) as server:
        assert server.process.wait(timeout=120) == 3
    assert "could not load the model" in server.stderr()


def test_error_bodies_keep_mlflow_fields_and_debug_adds_the_stack_trace(
    server_models: Path, tmp_path: Path
) -> None:
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    model_dir = server_models / "sleepy"
    wrong_column = {"dataframe_split": {"columns": ["y"], "data": [[1.0]]}}
    failing = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}, "params": {"sleep": -1.0}}
    model = mlflow.pyfunc.load_model(str(model_dir))

    def mlflow_answer(request: dict[str, Any]) -> dict[str, Any]:
        try:
            invocations(json.dumps(request), "application/json", model, None)  # type: ignore[no-untyped-call]
        except MlflowException as err:
            answer: dict[str, Any] = json.loads(err.serialize_as_json())  # type: ignore[no-untyped-call]
            return answer
        raise AssertionError("MLflow accepted the request")

    with run_server(model_dir, tmp_path / "plain", "--workers", "1") as server:
        ours = server.invoke(wrong_column)
        theirs = mlflow_answer(wrong_column)
        assert ours.status == 400
        assert set(ours.json()) == set(theirs)
        for field in ("error_code", "error_class", "sqlstate"):
            assert ours.json()[field] == theirs[field], field
        failed = server.invoke(failing)
        assert failed.status == 400
        assert "stack_trace" in mlflow_answer(failing)
        assert "stack_trace" not in failed.json()
    with run_server(model_dir, tmp_path / "debug", "--workers", "1", "--debug") as server:
        debug = server.invoke(failing).json()
        assert "Traceback" in debug["stack_trace"]
        assert "sleep length must be non-negative" in debug["stack_trace"]
