"""Fixtures for the scoring server: locally saved models and a running server process."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, free_port, wait_for_http


@pytest.fixture(scope="session")
def server_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("server-models")
    subprocess.run(
        [sys.executable, str(FIXTURES / "server_models.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def invoke(
        self, payload: Any, content_type: str = "application/json", **kwargs: Any
    ) -> Response:
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        return self.request("POST", "/invocations", body, {"Content-Type": content_type}, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def stdout(self) -> str:
        return (self.log_dir / "stdout.log").read_text()

    def stderr(self) -> str:
        return (self.log_dir / "stderr.log").read_text()


@contextlib.contextmanager
def run_server(
    model_dir: Path,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    ready_deadline: float = 120,
) -> Iterator[ServerProcess]:
    """``python -m packager_server`` on a free port; SIGTERM (then SIGKILL) on exit."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with (log_dir / "stdout.log").open("wb") as out, (log_dir / "stderr.log").open("wb") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "packager_server",
                "--model-dir",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            stdout=out,
            stderr=err,
            env=full_env,
            start_new_session=True,
        )
    server = ServerProcess(process=process, port=port, log_dir=log_dir, env=full_env)
    try:
        if wait_ready:
            wait_for_http(f"{server.url}/ready", ready_deadline, process, log_dir / "stderr.log")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
