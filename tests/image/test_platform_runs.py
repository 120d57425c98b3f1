"""The built image run the way each platform runs it (issue 14): the engine's own
``docker run`` settings for a Kubernetes pod's security context, SageMaker's ``serve``
argument, Vertex AI's and Cloud Run's variables. One container per platform, several
requests each; ``tests/server/test_platforms.py`` covers the same conventions in depth on
the server process, this module checks that the image keeps them.

The image is the session's ``pyfunc-code`` model (one string column ``text``; a lexicon
score per row), so the expected answers are known: "a good day" scores 2.0 and "an awful,
bad film" -5.0.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

TEXTS = ["a good day", "an awful, bad film"]
SCORES = [2.0, -5.0]
SPLIT = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
JSON = "application/json"
READY_DEADLINE = 120.0


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Running:
    container: Any
    host: str
    port: int

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, response.read(), response.getheader("content-type", ""))
        finally:
            conn.close()

    def post(self, path: str, body: Any, content_type: str = JSON, **headers: str) -> Answer:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, **{"Content-Type": content_type, **headers})

    def logs(self) -> str:
        return bytes(self.container.logs()).decode(errors="replace")[-4000:]


@contextlib.contextmanager
def running(client: Any, image: str, port: int, ready: str, **settings: Any) -> Iterator[Running]:
    """``docker run -d -p 127.0.0.1::PORT IMAGE`` with the platform's ``settings``; waits
    until ``ready`` answers 200; the container is always removed."""
    container = client.containers.run(
        image, detach=True, ports={f"{port}/tcp": ("127.0.0.1", None)}, **settings
    )
    try:
        container.reload()
        binding = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]
        server = Running(container, "127.0.0.1", int(binding["HostPort"]))
        _wait_ready(server, ready)
        yield server
    finally:
        container.remove(force=True)


def _wait_ready(server: Running, path: str) -> None:
    end = time.monotonic() + READY_DEADLINE
    url = f"http://{server.host}:{server.port}{path}"
    while time.monotonic() < end:
        server.container.reload()
        if server.container.status == "exited":
            pytest.fail(f"the container exited before {path} answered:\n{server.logs()}")
        with (
            contextlib.suppress(OSError, urllib.error.HTTPError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"{path} did not answer 200 within {READY_DEADLINE:.0f}s:\n{server.logs()}")


def _metric(server: Running, name: str) -> float:
    text = server.request("GET", "/metrics").body.decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


# -- Kubernetes: the pod security context packager manifests writes ------------------------


def test_kubernetes_pod_security_serves_v2_and_drains_on_sigterm(
    docker_client: Any, pyfunc_code_image: str
) -> None:
    """``readOnlyRootFilesystem`` with an ``emptyDir`` on /tmp, uid 10001, no capabilities,
    no privilege escalation: what ``packager manifests`` puts in the pod spec. KServe
    runs the same pod and speaks V2 to it."""
    settings = {
        "read_only": True,
        "tmpfs": {"/tmp": "rw,size=256m"},  # the emptyDir the manifests mount
        "user": "10001:10001",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "environment": {"PACKAGER_WORKERS": "2", "PACKAGER_GRACEFUL_TIMEOUT": "30"},
    }
    with running(docker_client, pyfunc_code_image, 8080, "/readyz", **settings) as pod:
        assert pod.request("GET", "/livez").status == 200
        answer = pod.post("/invocations", SPLIT)
        assert (answer.status, answer.json()) == (200, {"predictions": SCORES}), answer.body

        # KServe / Seldon / Triton clients: the Open Inference Protocol.
        assert pod.request("GET", "/v2/health/ready").status == 200
        metadata = pod.request("GET", "/v2/models/pyfunc-code").json()
        assert metadata["name"] == "pyfunc-code"
        assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [("text", "BYTES")]
        infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": TEXTS}]}
        inferred = pod.post("/v2/models/pyfunc-code/infer", infer)
        assert inferred.status == 200, inferred.body
        (output,) = inferred.json()["outputs"]
        assert (output["datatype"], output["data"]) == ("FP64", SCORES)

        # A prediction in flight when SIGTERM arrives is answered, then the server exits 0.
        rows = 600_000
        big = {"dataframe_split": {"columns": ["text"], "data": [["a good day"]] * rows}}
        conn = http.client.HTTPConnection(pod.host, pod.port, timeout=120)
        try:
            conn.request("POST", "/invocations", json.dumps(big).encode(), {"Content-Type": JSON})
            _wait_busy(pod)
            pod.container.kill(signal="SIGTERM")
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
        assert status == 200, body[:300]
        assert json.loads(body)["predictions"] == [2.0] * rows
        exit_code = pod.container.wait(timeout=60)["StatusCode"]
        assert exit_code == 0, pod.logs()


def _wait_busy(pod: Running) -> None:
    """Until a worker is predicting (``packager_workers_busy``), read from the other one."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if _metric(pod, "packager_workers_busy") >= 1:
            return
        time.sleep(0.05)
    pytest.fail("the large request never showed as a prediction in flight")


# -- SageMaker: `docker run IMAGE serve`, real-time and batch transform ---------------------


def test_sagemaker_serve_ping_invocations_and_batch_transform(
    docker_client: Any, pyfunc_code_image: str
) -> None:
    env = {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "60"}
    with running(
        docker_client, pyfunc_code_image, 8080, "/ping", command=["serve"], environment=env
    ) as endpoint:
        answer = endpoint.post("/invocations", SPLIT)
        assert (answer.status, answer.json()) == (200, {"predictions": SCORES})
        parameters = endpoint.request("GET", "/execution-parameters").json()
        assert parameters["MaxConcurrentTransforms"] == 1
        assert parameters["BatchStrategy"] == "MULTI_RECORD"

        # Batch transform: records split by line, as the job's ContentType and Accept say.
        lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
        answer = endpoint.post("/invocations", lines, "application/jsonlines")
        assert (answer.status, answer.body) == (200, b"2.0\n-5.0\n")
        csv_rows = b'a good day\n"an awful, bad film"\n'
        answer = endpoint.post("/invocations", csv_rows, "text/csv; header=absent", Accept=JSON)
        assert (answer.status, answer.json()) == (200, {"predictions": SCORES})
        answer = endpoint.post(
            "/invocations", csv_rows, "text/csv; header=absent", Accept="text/csv"
        )
        assert (answer.status, answer.content_type, answer.body) == (
            200,
            "text/csv",
            b"2.0\n-5.0\n",
        )
        bad = endpoint.post("/invocations", b'{"text": "a good day"}\n{oops\n', "application/jsonl")
        assert bad.status == 400
        assert "line 2" in bad.json()["message"]


# -- Vertex AI custom containers ---------------------------------------------------------


def test_vertex_routes_and_port(docker_client: Any, pyfunc_code_image: str) -> None:
    routes = {
        "AIP_HTTP_PORT": "8081",
        "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
    }
    with running(
        docker_client, pyfunc_code_image, 8081, routes["AIP_HEALTH_ROUTE"], environment=routes
    ) as endpoint:
        instances = {"instances": [{"text": t} for t in TEXTS]}
        answer = endpoint.post(routes["AIP_PREDICT_ROUTE"], instances)
        assert (answer.status, answer.json()) == (200, {"predictions": SCORES}), answer.body
        refused = endpoint.post(routes["AIP_PREDICT_ROUTE"], {"rows": TEXTS})
        assert refused.status == 400
        # The metrics name Vertex's routes by their variables, not by the request's path.
        metrics = endpoint.request("GET", "/metrics").body.decode()
        assert 'path="AIP_PREDICT_ROUTE",status="200"} 1' in metrics
        assert 'path="AIP_PREDICT_ROUTE",status="400"} 1' in metrics


# -- Cloud Run, Azure ML, anything with PORT ----------------------------------------------


def test_port_variable(docker_client: Any, pyfunc_code_image: str) -> None:
    with running(
        docker_client, pyfunc_code_image, 9090, "/ready", environment={"PORT": "9090"}
    ) as service:
        answer = service.post("/invocations", SPLIT)
        assert (answer.status, answer.json()) == (200, {"predictions": SCORES})
        # The image's HEALTHCHECK probes the port the server chose.
        probe = service.container.exec_run(["python", "-m", "packager_server.health"])
        assert probe.exit_code == 0, probe.output
