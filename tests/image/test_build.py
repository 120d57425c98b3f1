"""Images built by the real Docker engine from real registered models, then run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from tests.conftest import MlflowServer
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

PACKAGER = str(Path(sys.executable).with_name("packager"))


def build(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """``packager build --backend docker`` (these tests are the engine backend's)."""
    code = main(["build", "--backend", "docker", *args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, json.loads(out)


def run_in(image: str, script: str) -> str:
    return subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "sh", image, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def test_code_and_artifacts_model(
    registry_env: MlflowServer,
    base_image: str,
    pyfunc_code_image: str,
    capsys: pytest.CaptureFixture[str],
    docker_client: Any,
) -> None:
    tag = pyfunc_code_image
    image = docker_client.images.get(tag)
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    assert labels["io.packager.model.name"] == "pyfunc-code"
    assert labels["org.opencontainers.image.base.name"] == base_image
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    # By default: bytecode compiled, the packages' tests directories removed.
    _check_venv(docker_client, tag, bytecode=True, keep_tests=False)
    assert labels["io.packager.model.version"] == "1"
    assert labels["io.packager.lock.digest"].startswith("sha256:")
    # Multi-stage: no wheelhouse, lock or pip left in the image.
    assert run_in(tag, "ls /tmp/packager /opt/venv/bin/pip 2>&1 || true").count("No such file") == 2
    assert run_in(tag, "ls /opt/model/code/textclf /opt/model/artifacts/tokenizer").split() == [
        "/opt/model/artifacts/tokenizer:",
        "tokenizer_config.json",
        "vocab.txt",
        "/opt/model/code/textclf:",
        "__init__.py",
        "model.py",
    ]
    # The model's own layers come last: code, then artifacts, then the rest.
    history = [h.get("CreatedBy", "") for h in image.history()]
    steps = [
        i
        for i, line in enumerate(history)
        for part in ("COPY dir:", "COPY dir:", "COPY dir:")
        if part in line
    ]
    assert steps, history
    assert main(["test", tag, "--model", "models:/pyfunc-code/1"]) == 0
    report = capsys.readouterr().out
    assert "serving_input_example.json: 200 (expected 200) ok" in report
    assert "passed" in report


def _search_saved_image(saved: Path, needles: list[bytes]) -> list[str]:
    """Every layer file, the config and the history of a `docker save` tar."""
    hits = []
    with tarfile.open(saved) as outer:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            data = outer.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".tar") or member.name.endswith("layer.tar"):
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    for item in layer.getmembers():
                        if item.isfile():
                            content = layer.extractfile(item).read()  # type: ignore[union-attr]
                            hits += [f"{member.name}:{item.name}" for n in needles if n in content]
            hits += [member.name for n in needles if n in data]
    return hits


def test_base_with_another_python_is_refused_before_building(
    base_image: str, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(json.dumps(PYFUNC_SKLEARN))
    data["flavors"]["python_function"]["python_version"] = "3.12.1"
    model = write_model(tmp_path / "model", data, {"requirements.txt": "six==1.17.0\n"})
    code, out = build(capsys, str(model), "-t", "packager-test/never:1", "--base-image", base_image)
    assert code == 2
    assert "has Python 3.11, the model needs 3.12" in out["error"]["message"]
    assert "packager base build --python 3.12" in out["error"]["hint"]


def test_base_for_another_platform_is_refused_before_building(
    base_image: str,
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    docker_client: Any,
) -> None:
    model = write_model(tmp_path / "model", PYFUNC_SKLEARN, {"requirements.txt": "six==1.17.0\n"})
    native = docker_client.images.get(base_image).attrs["Architecture"]
    other = "arm64" if native == "amd64" else "amd64"
    images_before = {image.id for image in docker_client.images.list(all=True)}
    layout = tmp_path / "layout"
    for backend in (["-t", "packager-test/never:1"], ["--backend", "oci", "-o", str(layout)]):
        code, out = build(
            capsys, str(model), *backend, "--base-image", base_image, "--platform", f"linux/{other}"
        )
        assert code == 2, out
        message = f"is for linux/{native}, the image is for linux/{other}"
        assert message in out["error"]["message"]
        assert f"--platform linux/{native}" in out["error"]["hint"]
    assert not layout.exists()
    assert {image.id for image in docker_client.images.list(all=True)} == images_before


def test_base_build_is_reproducible(base_image: str, docker_client: Any) -> None:
    """A second mmdebstrap run of the recipe gives the same image id, not just the same
    files: no time from the clock in the image config (docker import would add one)."""
    from packager.image.base import RECIPE_LABEL, build_base

    again = f"packager-test/base-again-{uuid.uuid4().hex[:12]}:3.11"
    built = build_base("3.11", again, rebuild=True, client=docker_client)
    try:
        assert built.built
        first = docker_client.images.get(base_image)
        assert built.image_id == first.id
        assert first.labels[RECIPE_LABEL].startswith("sha256:")
        assert first.attrs["Created"].startswith("2026-01-01T00:00:00")
    finally:
        docker_client.images.remove(again)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_build_leaves_no_tag(  # noqa: PLR0917 - pytest fixtures
    signal_number: int,
    registry_env: MlflowServer,
    base_image: str,
    private_wheels: dict[str, Path],
    docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Ctrl-C or a kill while the engine builds: no tag, no running build container, and
    after Ctrl-C no build context left in the temporary directory (after a kill, the one
    left is in this test's own, not in /tmp).

    The model is private-wheel/2, which carries its own wheel (``add_libraries_to_model``):
    the re-run after the kill is also the Docker backend's build of a model with a wheel
    inside it."""
    # A base no earlier build used, so the engine's cache can't finish the build at once.
    nonce = uuid.uuid4().hex[:12]
    fresh_base = f"packager-test/base-{nonce}:3.11"
    docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {base_image}\nLABEL io.packager.test.nonce={nonce}\n".encode()),
        tag=fresh_base,
        rm=True,
    )
    tag = f"packager-test/interrupted-{nonce}:1"
    # No bytecode: the point is the interruption, and this build can't use the cache.
    model = "models:/private-wheel/2"
    interrupted_build = [PACKAGER, "build", model, "--no-bytecode"]
    interrupted_build += ["--backend", "docker"]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = subprocess.Popen(
        [*interrupted_build, "-t", tag, "--base-image", fresh_base],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # the engine's steps arrive as log lines
            seen.append(line)
            if "wheelinstall.py" in line and "Step" in line:
                break
        else:
            pytest.fail("the build ended before installing:\n" + "".join(seen[-30:]))
        time.sleep(2)  # inside the RUN step now
        process.send_signal(signal_number)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code != 0
    if signal_number == signal.SIGINT:
        assert code == 130
        assert list(temporary.iterdir()) == []
    assert (
        subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, check=False
        ).returncode
        != 0
    ), f"{tag} exists after an interrupted build"
    # The engine stops the build when its client goes away; no build container keeps running.
    deadline = time.monotonic() + 120
    running: list[Any] = []
    while time.monotonic() < deadline:
        running = [
            c
            for c in docker_client.containers.list()
            if c.attrs.get("Config", {}).get("Labels", {}).get("io.packager.test.nonce") == nonce
        ]
        if not running:
            break
        time.sleep(1)
    assert running == []
    if signal_number == signal.SIGKILL:  # the next run succeeds (nothing half-done in the way)
        # It is also the Docker backend's build without bytecode that keeps the packages'
        # tests directories (removed by default): both variants must serve.
        again = subprocess.run(
            [*interrupted_build, "--keep-tests", "-t", tag, "--base-image", fresh_base],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        _check_venv(docker_client, tag, bytecode=False, keep_tests=True)
        labels = docker_client.images.get(tag).attrs["Config"]["Labels"]
        assert labels["io.packager.model.name"] == "private-wheel"
        assert labels["org.opencontainers.image.base.name"] == fresh_base
        # `packager test` loads the model here to know the answers: its package too.
        monkeypatch.setenv("PYTHONPATH", str(private_wheels["acme-featurizer"]))
        assert main(["test", tag, "--model", model]) == 0
        docker_client.images.remove(tag, force=True)
    docker_client.images.remove(fresh_base, force=True)


# The Docker backend builds two models in this file: pyfunc-code (code and artifacts, the
# default bytecode and tests settings) and private-wheel/2 (a wheel inside the model; no
# bytecode, the packages' tests kept: the interrupted build's re-run). The hostile model of
# test_trust_images.py goes through this backend too, with index credentials in its
# requirements and in the environment, and every layer, config and history entry of the
# saved image is searched for them. Every other test model is built, tested, pushed and
# pulled through the default OCI backend (test_oci.py, which also compares its files and
# config with this backend's). More builds here (abs-wheel-path, sk-cloudpickle, sk-skops,
# params-model, two versions for layer reuse) cost CI over 15 minutes on this engine and
# found nothing the tests above miss.
# How many pycs and how many packages' tests directories /opt/venv holds.
VENV_PROBE = (
    "import pathlib; v = pathlib.Path('/opt/venv/lib/python3.11/site-packages'); "
    "print(sum(1 for _ in v.rglob('*.pyc')), "
    "sum(1 for p in v.glob('*/**/tests') if p.is_dir()))"
)


def _check_venv(docker_client: Any, tag: str, *, bytecode: bool, keep_tests: bool) -> None:
    probe = docker_client.containers.run(
        tag,
        entrypoint=["python", "-c", VENV_PROBE],
        remove=True,
        network_mode="none",
    )
    pycs, tests_dirs = map(int, probe.split())
    assert (pycs > 1000) is bytecode, f"{pycs} pycs in /opt/venv"
    # pandas, numpy, scipy, scikit-learn and pyarrow ship dozens of tests directories.
    assert (tests_dirs > 20) is keep_tests, f"{tests_dirs} tests directories in /opt/venv"
    assert tests_dirs == 0 or keep_tests
