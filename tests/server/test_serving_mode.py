"""Fork or spawn: a model whose loader leaves threads running is never forked after
loading (a forked worker would wait forever on a lock such a thread held); others are."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.server.conftest import run_server

pytestmark = pytest.mark.slow

ROW = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}


def _mode(metrics: str) -> str:
    found = re.search(r'packager_serving_mode\{[^}]*mode="(\w+)"\} 1', metrics)
    assert found, metrics
    return found.group(1)


def test_a_model_whose_loader_leaves_threads_is_spawned(
    server_models: Path, tmp_path: Path
) -> None:
    with run_server(
        server_models / "pooled", tmp_path, "--workers", "2", "--timeout", "20"
    ) as server:
        for _ in range(200):
            answer = server.invoke(ROW)
            assert answer.status == 200, answer.body
            assert answer.json() == {"predictions": [2.0]}
        assert _mode(server.request("GET", "/metrics").body.decode()) == "spawn"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    log = (tmp_path / "stderr.log").read_text()
    assert "serving mode spawn: loading the model left 1 thread(s) running" in log
    assert "a forked child's prediction did not end within" in log
    assert "restarting without the loaded model" in log


def test_a_model_whose_threads_survive_a_fork_is_forked(
    server_models: Path, tmp_path: Path
) -> None:
    """A thread left by the load is not enough to pay for N loads: a forked child that
    predicts the serving example in time shows that forking is safe."""
    with run_server(server_models / "idling", tmp_path, "--workers", "2") as server:
        for _ in range(20):
            answer = server.invoke(ROW)
            assert answer.status == 200, answer.body
            assert answer.json() == {"predictions": [2.0]}
        assert _mode(server.request("GET", "/metrics").body.decode()) == "fork"
    log = (tmp_path / "stderr.log").read_text()
    assert "left 1 thread(s) running" in log
    assert "a forked child answered the serving example: forking is safe" in log
    assert "serving mode spawn" not in log


def test_a_model_whose_loader_leaves_no_threads_is_forked(
    server_models: Path, tmp_path: Path
) -> None:
    with run_server(server_models / "sleepy", tmp_path, "--workers", "2") as server:
        assert server.invoke(ROW).status == 200
        assert _mode(server.request("GET", "/metrics").body.decode()) == "fork"
    assert "serving mode fork" in (tmp_path / "stderr.log").read_text()


def test_spawn_on_request_serves_and_replaces_a_killed_worker(
    server_models: Path, tmp_path: Path
) -> None:
    with run_server(
        server_models / "sleepy", tmp_path, "--workers", "2", "--serving-mode", "spawn"
    ) as server:
        assert _mode(server.request("GET", "/metrics").body.decode()) == "spawn"
        workers = _children(server.process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the replacement loads the model itself
            now = _children(server.process.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no replacement worker: {_children(server.process.pid)}")
        for _ in range(20):
            assert server.invoke(ROW).status == 200
    log = (tmp_path / "stderr.log").read_text()
    assert "serving mode spawn: --serving-mode spawn" in log
    assert "starting a new one" in log


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]
