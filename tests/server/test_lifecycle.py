"""The supervisor's life cycle at its edges: a worker killed mid-prediction, and SIGTERM
before the model has finished loading."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from packager_server.supervisor import TAKEOVER_GRACE_SECONDS
from tests.server.conftest import Response, ServerProcess, run_server

pytestmark = pytest.mark.slow

ONE_ROW = {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}


def _workers(server: ServerProcess) -> list[int]:
    """The supervisor's child processes (Linux)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _busy_workers(server: ServerProcess) -> int:
    text = server.request("GET", "/metrics", timeout=5).body.decode()
    match = re.search(r"^packager_workers_busy\{[^}]*\} (\d+)$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_a_killed_busy_worker_is_answered_for_and_replaced_by_one_left_alone(
    server_models: Path, tmp_path: Path
) -> None:
    timeout = 2.0
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", "--timeout", str(timeout)
    ) as server:
        # A slow prediction moves the next ones onto the worker's prediction thread, so
        # that its event loop still answers /metrics while it predicts.
        assert server.invoke({**ONE_ROW, "params": {"sleep": 0.3}}).status == 200
        outcome: dict[str, object] = {}

        def predict() -> None:
            try:
                outcome["answer"] = server.invoke({**ONE_ROW, "params": {"sleep": 1.8}})
            except OSError as err:
                outcome["error"] = err

        client = threading.Thread(target=predict)
        client.start()
        deadline = time.monotonic() + 10
        while _busy_workers(server) != 1:
            assert time.monotonic() < deadline, "the worker never reported a prediction"
            time.sleep(0.02)
        [victim] = _workers(server)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        client.join(timeout=30)
        # The kill hit the prediction: the supervisor answers it (a 500: a retry could
        # kill the next worker the same way), rather than the connection dropping.
        answer = outcome.get("answer")
        assert isinstance(answer, Response), outcome
        assert answer.status == 500, answer.body
        assert answer.json()["error_code"] == "INTERNAL_ERROR"
        assert "was killed by SIGKILL" in answer.json()["message"]

        deadline = time.monotonic() + 30
        while _workers(server) in ([], [victim]):
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.05)
        [replacement] = _workers(server)
        # The supervisor stops a worker busy for timeout + grace. The replacement stays
        # idle (a prediction of its own would clear a stale busy mark) for twice that.
        until = killed_at + 2 * (timeout + TAKEOVER_GRACE_SECONDS)
        while time.monotonic() < until:
            assert _workers(server) == [replacement], server.stderr()
            assert _get(f"{server.url}/live") == 200
            time.sleep(0.2)
        assert _busy_workers(server) == 0
        assert server.invoke(ONE_ROW).json() == {"predictions": [3.0]}
    assert "has been predicting for over" not in server.stderr()


def _wait_for_the_load(server: ServerProcess, loading: Path) -> None:
    """Until the sleepy model's load has begun in a worker (it writes SLEEPY_LOAD_PIDFILE)."""
    deadline = time.monotonic() + 60
    while not loading.is_file() or not loading.read_text():
        assert server.process.poll() is None, server.stderr()
        assert time.monotonic() < deadline, server.stderr()
        time.sleep(0.1)


def test_a_spawned_worker_hanging_in_c_while_loading_stops_at_once_on_sigterm(
    server_models: Path, tmp_path: Path
) -> None:
    """A framework's load can spend minutes in C, where no Python signal handler runs: a
    spawned worker leaves SIGTERM to the kernel until it has loaded, so the server stops
    without waiting out --graceful-timeout and killing it."""
    loading = tmp_path / "loading.pid"
    env = {"SLEEPY_LOAD_PIDFILE": str(loading), "SLEEPY_LOAD_HANG": "1"}
    args = ("--workers", "1", "--serving-mode", "spawn", "--graceful-timeout", "20")
    with run_server(server_models / "sleepy", tmp_path, *args, env=env, wait_ready=False) as server:
        _wait_for_the_load(server, loading)
        worker = int(loading.read_text())
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    log = server.stderr()
    assert "did not stop in time" not in log, log
    assert log.rstrip().endswith("stopped"), log
    assert not Path(f"/proc/{worker}").exists()


def test_a_stop_sent_to_the_whole_group_while_a_spawned_worker_loads_is_a_plain_stop(
    server_models: Path, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches the loading worker too: that is the stop, not a
    worker to replace."""
    loading = tmp_path / "loading.pid"
    env = {"SLEEPY_LOAD_PIDFILE": str(loading), "SLEEPY_LOAD_SECONDS": "120"}
    args = ("--workers", "1", "--serving-mode", "spawn")
    with run_server(server_models / "sleepy", tmp_path, *args, env=env, wait_ready=False) as server:
        _wait_for_the_load(server, loading)
        os.killpg(server.process.pid, signal.SIGINT)  # run_server starts a new session
        assert server.process.wait(timeout=60) == 0
    log = server.stderr()
    assert "before serving" not in log, log
    assert log.rstrip().endswith("stopped"), log


def test_sigterm_while_loading_exits_0_with_a_log_line(server_models: Path, tmp_path: Path) -> None:
    env = {"SLEEPY_LOAD_SECONDS": "120"}
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "1", env=env, wait_ready=False
    ) as server:
        deadline = time.monotonic() + 60
        while True:  # loading: alive, not ready
            with contextlib.suppress(OSError):
                if _get(f"{server.url}/ready") == 503:
                    break
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    log = server.stderr()
    assert "received SIGTERM while loading the model" in log, log
    assert log.rstrip().endswith("stopped"), log
    with pytest.raises(ConnectionRefusedError):  # and nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
