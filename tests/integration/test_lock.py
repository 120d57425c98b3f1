"""`packager lock` for real: uv and pip-tools against PyPI, a private index on 127.0.0.1
(basic auth, a wheel that exists nowhere else), models' own wheels, and the wheelhouse.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from packager.env.lock import parse_lock
from tests.conftest import MlflowServer
from tests.unit.modeldirs import PYFUNC_SKLEARN, write_model

pytestmark = pytest.mark.slow


def lock_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["lock", *args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, json.loads(out), err


def small_model(tmp_path: Path, requirements: str, python: str = "3.11.7") -> Path:
    data = json.loads(json.dumps(PYFUNC_SKLEARN))
    data["flavors"]["python_function"]["python_version"] = python
    return write_model(tmp_path / "model", data, {"requirements.txt": requirements})


def test_private_index_with_basic_auth(
    tmp_path: Path, cache_dir: Path, private_index: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model(
        tmp_path, f"--extra-index-url {private_index.url}\nacme-private-lib==1.0.0\nsix==1.17.0\n"
    )
    # No credentials: the index answers 401 and the error names it, without secrets.
    code, out, err = lock_json(capsys, str(model))
    assert code == 22
    assert out["error"]["message"] == (
        f"the package index {private_index.url} answered 401 Unauthorized: no credentials were "
        "given with its URL, and netrc has none it accepts (while locking with uv)"
    )
    # Credentials from --extra-index-url, matched to the model's index by host and path.
    lock_path = tmp_path / "model.lock"
    code, out, err = lock_json(
        capsys,
        str(model),
        "-o",
        str(lock_path),
        "--extra-index-url",
        private_index.url_with_credentials,
        "--download",
    )
    assert code == 0, out
    lock = parse_lock(lock_path.read_text())
    private = lock.get("acme-private-lib")
    assert private is not None
    assert private.version == "1.0.0"
    assert any("the model's requirements" in via for via in private.via)
    assert any(authorized for _, authorized in private_index.requests)
    files = {f["name"]: f for f in out["wheelhouse"]["files"]}
    assert "sha256:" + files["acme-private-lib"]["sha256"] in private.hashes
    # The lock keeps the index, never the credentials: not in the file, output or logs.
    assert f"--extra-index-url {private_index.url}" in lock_path.read_text()
    for text in (lock_path.read_text(), json.dumps(out), err):
        assert private_index.password not in text
    for cached in cache_dir.rglob("*.txt"):
        assert private_index.password not in cached.read_text()


def test_credentials_from_netrc(
    tmp_path: Path,
    cache_dir: Path,
    private_index: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(
        f"machine 127.0.0.1 login {private_index.username} password {private_index.password}\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    model = small_model(
        tmp_path, f"--extra-index-url {private_index.url}\nacme-private-lib==1.0.0\n"
    )
    code, out, _ = lock_json(capsys, str(model))
    assert code == 0, out
    assert any(p["name"] == "acme-private-lib" for p in out["packages"])


def test_server_requirements_join_the_lock_and_conflicts_name_both_sides(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model(tmp_path, "uvicorn==0.20.0\n")
    code, out, _ = lock_json(capsys, str(model))
    assert code == 15
    message = out["error"]["message"]
    assert "the model requires uvicorn==0.20.0 (requirements.txt:1)" in message
    assert "packager_server requires uvicorn>=0.30" in message


def test_lock_for_another_python_and_platform(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model(tmp_path, "six==1.17.0\n")
    code, out, _ = lock_json(
        capsys, str(model), "--python", "3.12", "--platform", "linux/arm64", "--download"
    )
    assert code == 0, out
    assert out["target"] == {"python": "3.12", "python_full": None, "platform": "linux/arm64"}
    files = {f["name"]: f["filename"] for f in out["wheelhouse"]["files"]}
    assert "aarch64" in files["uvloop"]
    assert "cp312" in files["uvloop"]
    assert all("x86_64" not in name for name in files.values())
    # pip-tools resolves for this interpreter only: it refuses, and names uv.
    code, out, _ = lock_json(capsys, str(model), "--python", "3.12", "--resolver", "pip-tools")
    assert code == 2
    assert "--resolver uv" in out["error"]["hint"]


def test_pip_tools_matches_uv_on_this_interpreter(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    python = ".".join(map(str, sys.version_info[:3]))
    model = small_model(tmp_path, "six==1.17.0\n", python=python)
    code, uv, _ = lock_json(capsys, str(model))
    assert code == 0, uv
    code, pip_tools, _ = lock_json(capsys, str(model), "--resolver", "pip-tools")
    assert code == 0, pip_tools
    assert pip_tools["resolver"].startswith("pip-tools")
    pins = {(p["name"], p["version"]) for p in uv["packages"]}
    assert pins == {(p["name"], p["version"]) for p in pip_tools["packages"]}
    assert all(p["hashes"] for p in pip_tools["packages"])


def test_cached_and_user_locks(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model(tmp_path, "six==1.17.0\n")
    first = tmp_path / "first.lock"
    code, out, _ = lock_json(capsys, str(model), "-o", str(first))
    assert (code, out["cached"]) == (0, False)
    code, out, _ = lock_json(capsys, str(model))
    assert (code, out["cached"]) == (0, True)
    assert out["digest"] == parse_lock(first.read_text()).digest
    # A lock the user keeps: used as is when it satisfies the model...
    code, out, _ = lock_json(capsys, str(model), "--lock", str(first))
    assert code == 0
    assert out["digest"] == parse_lock(first.read_text()).digest
    # ...and rejected, with the reason, when it does not.
    edited = tmp_path / "edited.lock"
    edited.write_text(first.read_text().replace("six==1.17.0", "six==1.16.0"))
    code, out, _ = lock_json(capsys, str(model), "--lock", str(edited))
    assert code == 12
    assert "six==1.16.0 does not satisfy six==1.17.0" in out["error"]["message"]


@pytest.mark.mlflow_server
def test_registered_models_with_their_own_wheels(
    registry_env: MlflowServer,
    private_wheels: dict[str, Path],
    private_index: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # add_libraries_to_model: the private wheel comes from the model's wheels/.
    code, out, _ = lock_json(capsys, "models:/private-wheel/2", "--download")
    assert code == 0, out
    acme = next(p for p in out["packages"] if p["name"] == "acme-featurizer")
    wheel = next(f for f in out["wheelhouse"]["files"] if f["name"] == "acme-featurizer")
    assert "sha256:" + wheel["sha256"] in acme["hashes"]
    assert any("packager_server" in via for p in out["packages"] for via in p["via"])
    # Its requirements.txt names the private index with the credentials it was logged
    # with: refused (not silently dropped) until the user gives that index's credentials.
    code, out, _ = lock_json(capsys, "models:/abs-wheel-path/1")
    assert code == 22
    assert out["error"]["message"] == (
        f"requirements.txt:2: the model's requirements give credentials for the package index "
        f"{private_index.url}; packager does not use credentials stored in a model"
    )  # line 1 is the mlflow pin MLflow adds
    assert private_index.password not in json.dumps(out)
    creds = ("--extra-index-url", private_index.url_with_credentials)
    # A /dbfs/… wheel path: an error naming the file until --wheel-dir provides it.
    code, out, _ = lock_json(capsys, "models:/abs-wheel-path/1", *creds)
    assert code == 13
    assert (
        "/dbfs/FileStore/wheels/acme_featurizer-0.1.0-py3-none-any.whl" in out["error"]["message"]
    )
    assert "--wheel-dir" in out["error"]["hint"]
    wheel_dir = private_wheels["acme-featurizer"].parent
    # The user's credentialed URL for that index is matched to it (by host and path).
    code, out, _ = lock_json(
        capsys,
        "models:/abs-wheel-path/1",
        "--wheel-dir",
        str(wheel_dir),
        "--extra-index-url",
        private_index.url_with_credentials,
    )
    assert code == 0, out
    assert any(p["name"] == "acme-featurizer" for p in out["packages"])


def test_a_changed_file_on_the_index_is_refused(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.private_index import PrivateIndex
    from tests.fixtures.wheelmaker import build_wheel

    wheel = build_wheel(
        tmp_path / "w", "acme_tampered", "1.0.0", {"acme_tampered/__init__.py": "VALUE = 1\n"}
    )
    index = PrivateIndex(wheels=[wheel]).start()
    try:
        model = small_model(tmp_path, f"--extra-index-url {index.url}\nacme-tampered==1.0.0\n")
        creds = ("--extra-index-url", index.url_with_credentials)
        code, out, _ = lock_json(capsys, str(model), *creds)
        assert code == 0, out
        # Same name and version, other bytes: what a compromised or rebuilt index serves.
        build_wheel(
            tmp_path / "w",
            "acme_tampered",
            "1.0.0",
            {"acme_tampered/__init__.py": "VALUE = 2  # changed\n"},
        )
        code, out, _ = lock_json(capsys, str(model), *creds, "--download")
        assert code == 16
        assert "does not match the lock's hashes" in out["error"]["message"]
        cached = [p.name for p in (cache_dir / "wheels").rglob("*.whl")]
        assert not any(name.startswith("acme_tampered") for name in cached)
    finally:
        index.stop()


@pytest.mark.mlflow_server
def test_skinny_lock_installs_offline_and_loads_the_model(
    registry_env: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wheelhouse alone (no index) installs the skinny lock, and the model loads."""
    import subprocess
    import sys

    import mlflow.pyfunc
    import pandas as pd

    lock_path = tmp_path / "skinny.lock"
    code, out, _ = lock_json(
        capsys, "models:/sk-skops/1", "--mlflow-skinny", "--download", "-o", str(lock_path)
    )
    assert code == 0, out
    names = {p["name"] for p in out["packages"]}
    assert "mlflow-skinny" in names
    assert not names & {"mlflow", "flask", "sqlalchemy", "matplotlib", "gunicorn"}
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    for wheel in out["wheelhouse"]["files"]:
        (wheels / wheel["filename"]).symlink_to(wheel["path"])
    venv = tmp_path / "venv"
    uv = str(Path(sys.executable).with_name("uv"))
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            "--no-index",
            "--find-links",
            str(wheels),
            "--require-hashes",
            "-r",
            str(lock_path),
        ],
        check=True,
        timeout=600,
    )
    inspected = json.loads(
        subprocess.run(
            [
                str(Path(sys.executable).with_name("packager")),
                "inspect",
                "models:/sk-skops/1",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    model_dir = inspected["spec"]["path"]
    example = json.loads((Path(model_dir) / "serving_input_example.json").read_text())
    frame = pd.DataFrame(**example["dataframe_split"])
    expected = [int(v) for v in mlflow.pyfunc.load_model(model_dir).predict(frame)]
    script = (
        "import importlib.util, json, sys; import mlflow.pyfunc, pandas as pd; "
        "assert importlib.util.find_spec('flask') is None; "
        f"e = json.load(open({str(Path(model_dir) / 'serving_input_example.json')!r})); "
        f"m = mlflow.pyfunc.load_model({model_dir!r}); "
        "print(json.dumps([int(v) for v in m.predict(pd.DataFrame(**e['dataframe_split']))]))"
    )
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_conda_packages_are_refused_not_silently_dropped(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model(
        tmp_path / "model",
        PYFUNC_SKLEARN,
        {
            "requirements.txt": "six==1.17.0\n",
            "conda.yaml": (
                # A channel nothing answers at: conda packages are solved (see
                # test_conda_lock.py), and a channel that fails is an error, not a skip.
                "channels: ['http://127.0.0.1:9/conda-forge']\ndependencies:\n"
                "- python=3.11.7\n- libgomp=13.2\n- pip:\n  - six==1.17.0\n"
            ),
        },
    )
    code, out, _ = lock_json(capsys, str(model))
    assert code == 15
    assert "the conda channel http://127.0.0.1:9/conda-forge" in out["error"]["message"]
    assert "--conda-channel" in out["error"]["hint"]
    code, out, _ = lock_json(capsys, str(model), "--ignore-conda")
    assert code == 0, out
    # A conda.yaml with only python and pip packages is the pip path: no refusal.
    plain = write_model(tmp_path / "plain", PYFUNC_SKLEARN, {"requirements.txt": "six==1.17.0\n"})
    code, out, _ = lock_json(capsys, str(plain))
    assert code == 0, out


def test_a_package_without_a_wheel(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Built here when this machine matches the target; otherwise a clear error."""
    import sys

    from tests.fixtures.private_index import PrivateIndex
    from tests.fixtures.wheelmaker import build_sdist

    sdist = build_sdist(
        tmp_path / "dist",
        "acme_sdist_only",
        "1.0.0",
        {"acme_sdist_only/__init__.py": "VALUE = 7\n"},
    )
    index = PrivateIndex(wheels=[sdist]).start()
    try:
        python = ".".join(map(str, sys.version_info[:3]))
        model = small_model(
            tmp_path, f"--extra-index-url {index.url}\nacme-sdist-only==1.0.0\n", python=python
        )
        creds = ("--extra-index-url", index.url_with_credentials)
        code, out, _ = lock_json(
            capsys, str(model), *creds, "--platform", "linux/arm64", "--download"
        )
        assert code == 17, out
        assert "acme-sdist-only==1.0.0 has no wheel for" in out["error"]["message"]
        assert "linux/arm64" in out["error"]["message"]
        code, out, _ = lock_json(capsys, str(model), *creds, "--download")
        assert code == 0, out
        built = next(f for f in out["wheelhouse"]["files"] if f["name"] == "acme-sdist-only")
        assert built["built_here"] is True
        assert built["filename"].startswith("acme_sdist_only-1.0.0-py3-none-any")
    finally:
        index.stop()


# Item 12 of the trust-boundaries issue: what a model's own requirements may not do.


@dataclass
class LocalServer:
    """An HTTP server on 127.0.0.1 that records every request's path and headers."""

    port: int
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def index(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple"


@contextmanager
def local_server(status: int, files: dict[str, bytes] | None = None) -> Iterator[LocalServer]:
    """Answers ``files[path]`` with 200, everything else with ``status`` (401: basic auth)."""
    served = files or {}
    server = LocalServer(port=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.requests.append((self.path, dict(self.headers.items())))
            body = served.get(self.path)
            self.send_response(200 if body is not None else status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            if body is not None and self.command == "GET":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.port = int(http.server_address[1])
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        thread.join(timeout=10)


def lock_debug(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """``lock --debug --json``: every log line (commands run included) lands in ``err``."""
    code = main(["lock", *args, "--json", "--debug"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def everything_written(cache_dir: Path, *texts: str) -> str:
    """``texts`` and every lock and wheel packager cached."""
    made = [cache_dir / "locks", cache_dir / "wheels"]
    files = [
        p.read_bytes().decode(errors="replace") for d in made for p in d.rglob("*") if p.is_file()
    ]
    return "\n".join([*texts, *files])


def test_credentials_in_the_models_index_line_and_an_index_that_answers_401(
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    secret = "SECRET-in-the-model-4711"
    with local_server(401) as index:
        model = small_model(
            tmp_path,
            f"--extra-index-url http://ci:{secret}@127.0.0.1:{index.port}/simple\nmlflow==2.16.2\n",
        )
        # The password in the model is neither dropped silently nor used: refused up front,
        # naming the line and how to pass credentials, before anything is asked of the index.
        code, out, err = lock_debug(capsys, str(model), "--mlflow-skinny")
        assert code == 22, out
        assert out["error"]["type"] == "IndexAuthError"
        assert out["error"]["message"] == (
            f"requirements.txt:1: the model's requirements give credentials for the package "
            f"index {index.index}; packager does not use credentials stored in a model"
        )
        assert "--extra-index-url" in out["error"]["hint"]
        assert index.requests == []
        seen = [err, json.dumps(out)]
        # The user names the index without credentials: uv gets the index's 401, and it is
        # reported as the index refusing us (it used to be "the model's requirements conflict
        # with the scoring server's" about mlflow-skinny==2.16.2 and mlflow-skinny>=2.9).
        code, out, err = lock_debug(
            capsys, str(model), "--mlflow-skinny", *("--extra-index-url", index.index)
        )
        assert code == 22, out
        assert out["error"]["message"] == (
            f"the package index {index.index} answered 401 Unauthorized: no credentials were "
            "given with its URL, and netrc has none it accepts (while locking with uv)"
        )
        assert "conflict" not in json.dumps(out)
        assert index.requests, "uv asked the index"
        seen += [err, json.dumps(out)]
        # Wrong credentials from the environment: said so, and never shown.
        wrong = "WRONG-token-0815"
        monkeypatch.setenv(
            "PIP_EXTRA_INDEX_URL", f"http://bob:{wrong}@127.0.0.1:{index.port}/simple"
        )
        code, out, err = lock_debug(capsys, str(model), "--mlflow-skinny")
        assert code == 22, out
        assert out["error"]["message"] == (
            f"the package index {index.index} answered 401 Unauthorized: it refused the "
            "credentials given with its URL (while locking with uv)"
        )
        seen += [err, json.dumps(out)]
        assert wrong not in everything_written(cache_dir, *seen)
    # The model's password reached no output, log line, error, cached file, nor the index.
    assert secret not in everything_written(cache_dir, *seen)
    assert "running: " in seen[2]  # the debug log was captured, commands included
    sent = [h.get("Authorization", "") for _, h in index.requests]
    assert not any(secret in base64.b64decode(a.split()[-1]).decode() for a in sent if a)
    assert not list(cache_dir.rglob("locks/v1/*.txt"))


def test_direct_url_requirements(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.wheelmaker import build_wheel

    wheel = build_wheel(tmp_path / "mine", "somepkg", "1.0", {"somepkg/__init__.py": "VALUE = 1\n"})
    with local_server(404, {f"/{wheel.name}": wheel.read_bytes()}) as files:
        url = f"http://127.0.0.1:{files.port}/{wheel.name}"
        model = small_model(tmp_path, f"somepkg @ {url}\nsix==1.17.0\n")
        # Refused up front with the line (it used to fail parsing uv's output:
        # "uv's output:…: 'somepkg @ http://…' is not pinned with ==").
        code, out, _ = lock_json(capsys, str(model))
        assert code == 14, out
        assert out["error"]["message"].startswith(
            f"requirements.txt:1: 'somepkg @ {url}' installs somepkg from a URL"
        )
        assert f"download {wheel.name}" in out["error"]["hint"]
        assert "--wheel-dir" in out["error"]["hint"]
        # The user's copy of that wheel is locked by its hash, and the URL is never fetched.
        lock_path = tmp_path / "model.lock"
        code, out, _ = lock_json(
            capsys, str(model), "--wheel-dir", str(wheel.parent), "--download", "-o", str(lock_path)
        )
        assert code == 0, out
        assert files.requests == []
    locked = parse_lock(lock_path.read_text()).get("somepkg")
    assert locked is not None
    assert locked.version == "1.0"
    assert locked.hashes == ("sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest(),)
    assert any(f["filename"] == wheel.name for f in out["wheelhouse"]["files"])
