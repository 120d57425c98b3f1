"""Hostile input over real HTTP: the server answers every request well, and keeps serving.

Random JSON, deep nesting, huge numbers, invalid UTF-8, random content types, truncated
and garbage requests. Each answer must be a complete HTTP response; every failure must be
JSON with an error_code; afterwards the server must still answer a normal prediction.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import ServerProcess, run_server

pytestmark = pytest.mark.slow

GOOD = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
format_keys = st.sampled_from(
    [
        "dataframe_split",
        "dataframe_records",
        "instances",
        "inputs",
        "params",
        "messages",
        "prompt",
        "columns",
        "data",
    ]
)
payloads = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(format_keys, json_values, max_size=3).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=20000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=20000).map(lambda n: b'{"inputs": ' + b"9" * n + b"}"),
    st.sampled_from(
        [
            b'{"inputs": 1e999999}',
            b'{"inputs": -1e999999}',
            b"\xff\xfe\x00",
            b'{"dataframe_split": {"columns": ["x"], "data": [[NaN]]}}',
            b"",
        ]
    ),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=utf-16",
        "text/csv",
        "application/vnd.apache.parquet",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "application/json; charset=",
        ";;;",
    ]
)


@pytest.fixture(scope="module")
def server(
    server_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with run_server(
        server_models / "sleepy",
        tmp_path_factory.mktemp("robust"),
        "--workers",
        "1",
        "--timeout",
        "30",
    ) as running:
        yield running


def _still_serving(server: ServerProcess) -> None:
    assert server.invoke(GOOD).json() == {"predictions": [2.0]}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=payloads, content_type=content_types)
def test_any_body_gets_a_json_answer(server: ServerProcess, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = server.request("POST", "/invocations", body, headers, timeout=30)
    assert 200 <= answer.status < 600
    data = json.loads(answer.body)
    if answer.status >= 400:
        assert isinstance(data["error_code"], str)
        assert isinstance(data["message"], str)
    assert answer.status < 500, (answer.status, data, body[:100], content_type)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(min_size=1, max_size=400))
def test_garbage_on_the_wire(server: ServerProcess, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    if received:  # a complete response, JSON when it is an error
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 ")
        status = int(head.split()[1])
        if status >= 400:
            assert "error_code" in json.loads(body)


def test_truncated_body_then_disconnect(server: ServerProcess) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b'application/json\r\nContent-Length: 1000\r\n\r\n{"dataframe_sp'
            )
    _still_serving(server)


def test_server_survives_everything_above(server: ServerProcess) -> None:
    for _ in range(3):
        _still_serving(server)
    assert server.process.poll() is None
