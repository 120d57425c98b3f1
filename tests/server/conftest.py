"""Fixtures for the scoring server: locally saved models and a running server process."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
        return self._log("stdout.log")

    def stderr(self) -> str:
        return self._log("stderr.log")

    def _log(self, name: str) -> str:
        """The complete lines the server has written so far.

        A read can land in the middle of a worker's write: the kernel copies a write into the
        file page by page and grows the file after each page, so a line that crosses a page
        boundary can be read half-written (CI once parsed such half of a JSON access-log
        line). While the server runs, the text after the last newline is left for the next
        read; once it has exited, everything is returned.
        """
        text = (self.log_dir / name).read_text()
        if self.process.poll() is None:
            text = text[: text.rfind("\n") + 1]
        return text


def received_by_server(port: int, client: socket.socket) -> bool:
    """True once the server process has read everything ``client`` sent (Linux).

    The kernel lists every TCP socket in /proc/net/tcp with the bytes waiting in its
    receive queue: the server's end of this connection has an empty queue once the worker
    read the request from it.
    """
    client_port = client.getsockname()[1]
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16) == 0
    return False


def wait_until(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:g}s"
        time.sleep(0.02)


@contextlib.contextmanager
def server_process(
    argv: list[str], env: dict[str, str], port: int, log_dir: Path
) -> Iterator[ServerProcess]:
    """``python -m packager_server ARGV`` with exactly ``env``, its output in ``log_dir``;
    SIGTERM (then SIGKILL to its process group) on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "stdout.log").open("wb") as out, (log_dir / "stderr.log").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "packager_server", *argv],
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        yield ServerProcess(process=process, port=port, log_dir=log_dir, env=env)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


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
    argv = ["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *args]
    with server_process(argv, {**os.environ, **(env or {})}, port, log_dir) as server:
        if wait_ready:
            wait_for_http(
                f"{server.url}/ready", ready_deadline, server.process, log_dir / "stderr.log"
            )
        yield server
