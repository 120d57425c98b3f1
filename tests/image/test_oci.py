"""The daemonless OCI backend on real models, a real engine and a real registry.

For the test models (see MODELS for which, and where the others are covered): two builds in
different directories, each with an empty packager cache, a different umask, time zone and
host name, must give the same manifest digest; the image loaded into the engine passes
``packager test``; pushed to a local registry and pulled back by digest, it is the same
image. One model's image is compared file by file with the Docker backend's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MlflowServer
from tests.image.conftest import forbid_user_namespaces

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]

PACKAGER = str(Path(sys.executable).with_name("packager"))
BUILD_TIMEOUT = 1800

# Which model version, and what it needs besides the reference: the two models whose
# wheels don't come from an index (one inside the model, one from --wheel-dir with
# mlflow-skinny and a private index), the inputs most likely to differ between two builds.
# The other models are built, reproduced and tested by the tests below, which CI pays for
# anyway: sk-cloudpickle by test_check_reproducible_and_warm_rebuild (two builds from empty
# caches) and test_load_sends_only_the_layers_the_engine_lacks (packager test), params-model
# by test_bases_from_an_archive_and_a_registry (three bases, the same layers, packager
# test), pyfunc-code by test_same_files_and_config_as_the_docker_backend and, reproduced
# from its provenance, by test_release_rebuild.py. sk-skops differs from sk-cloudpickle only
# in the model file's format, which the server tests cover. Two builds each of pyfunc-code
# and sk-skops here cost CI 6 minutes and proved nothing more.
MODELS = {
    "private-wheel": "models:/private-wheel/2",
    "abs-wheel-path": "models:/abs-wheel-path/1",
}

# Compared between images: everything a running container sees, minus what the engine
# mounts into it.
WALK = """
import hashlib, json, os, stat, sys
skip = {"/proc", "/sys", "/dev", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf",
        "/.dockerenv"}
out = []
for folder, dirs, files in os.walk("/"):
    dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) not in skip)
    for name in sorted(dirs) + sorted(files):
        path = os.path.join(folder, name)
        if path in skip:
            continue
        info = os.lstat(path)
        detail = ""
        if stat.S_ISLNK(info.st_mode):
            detail = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                detail = hashlib.sha256(f.read()).hexdigest()
        out.append([path, info.st_mode, info.st_uid, info.st_gid, detail])
json.dump(out, sys.stdout)
"""


def _build_command(
    workdir: Path,
    model: str,
    base: str,
    extra: list[str],
    *,
    umask: str,
    tz: str,
    hostname: str,
) -> subprocess.Popen[str]:
    """``packager build --backend oci`` in its own directory, umask, TZ and UTS namespace."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to vary the host name", pytrace=False)
    workdir.mkdir(parents=True)
    argv = [PACKAGER, "build", model, "--backend", "oci", "-o", "image", "--json"]
    argv += ["--base-image", base, *extra]
    script = f'hostname {hostname} && umask {umask} && exec "$@"'
    return subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", script, "build", *argv],
        cwd=workdir,
        env={**os.environ, "TZ": tz, "PACKAGER_CACHE_DIR": str(workdir / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=BUILD_TIMEOUT)
    if process.returncode != 0:
        pytest.fail(f"the OCI build failed:\n{out}\n{err[-4000:]}", pytrace=False)
    assert "Traceback" not in err
    result: dict[str, Any] = json.loads(out)
    return result


def _extra_args(name: str, private_wheels: dict[str, Path]) -> list[str]:
    if name == "abs-wheel-path":
        return ["--wheel-dir", str(private_wheels["acme-featurizer"].parent), "--mlflow-skinny"]
    return []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reproducible_loaded_tested_pushed_and_pulled(  # noqa: PLR0917 - pytest fixtures
    name: str,
    registry_env: MlflowServer,
    base_image: str,
    local_registry: str,
    private_index: Any,
    private_wheels: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    docker_client: Any,
) -> None:
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", private_index.url_with_credentials)
    model = MODELS[name]
    extra = _extra_args(name, private_wheels)
    pushed_tag = f"{local_registry}/oci/{name}:1"
    # Two builds at once (the machine has two cores), as different as a machine can make them.
    first = _build_command(
        tmp_path / "a",
        model,
        base_image,
        [*extra, "-t", pushed_tag, "--load", "--push"],
        umask="022",
        tz="UTC",
        hostname="build-a",
    )
    second = _build_command(
        tmp_path / "elsewhere" / "b",
        model,
        base_image,
        extra,
        umask="077",
        tz="Pacific/Chatham",
        hostname="build-b",
    )
    a, b = _finish(first), _finish(second)
    assert a["manifest_digest"] == b["manifest_digest"], (a, b)
    # From empty caches: at least the venv, the server and the model (a model without code
    # or artifacts has two identical near-empty layers, written once).
    assert a["layers_written"] >= 3
    layout_a = (tmp_path / "a" / "image" / "index.json").read_bytes()
    layout_b = (tmp_path / "elsewhere" / "b" / "image" / "index.json").read_bytes()
    assert json.loads(layout_a)["manifests"][0]["digest"] == a["manifest_digest"]
    assert json.loads(layout_b)["manifests"][0]["digest"] == a["manifest_digest"]

    # Loaded into the engine: the image id is the config digest, and it serves the model.
    loaded = docker_client.images.get(pushed_tag)
    assert loaded.id == a["image_id"]
    # `packager test` computes the expected answers here, so the model's private package
    # must be importable here too (the image has it from the wheelhouse).
    local = (
        {"PYTHONPATH": str(private_wheels["acme-featurizer"])} if name == "private-wheel" else {}
    )
    check = subprocess.run(
        [PACKAGER, "test", pushed_tag, "--model", model],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **local},
    )
    assert check.returncode == 0, check.stdout + check.stderr[-3000:]
    assert "passed" in check.stdout

    # Pushed with the distribution API; pulled back by digest, it is the same image.
    assert a["pushed"]["digest"] == a["manifest_digest"]
    assert a["pushed"]["uploaded"] >= 1
    docker_client.images.remove(loaded.id, force=True)
    pinned = f"{local_registry}/oci/{name}@{a['manifest_digest']}"
    subprocess.run(["docker", "pull", pinned], check=True, capture_output=True, timeout=600)
    pulled = docker_client.images.get(pinned)
    assert pulled.id == a["image_id"]
    assert any(d.endswith(a["manifest_digest"]) for d in pulled.attrs["RepoDigests"])
    docker_client.images.remove(pulled.id, force=True)


def test_same_files_and_config_as_the_docker_backend(
    registry_env: MlflowServer,
    base_image: str,
    pyfunc_code_image: str,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    tag = "packager-test/oci-pyfunc-code:1"
    # Where user namespaces are forbidden, the daemonless build still writes the base's own
    # bytecode: the tree below is compared byte for byte with the Docker backend's.
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "true"],
        preexec_fn=forbid_user_namespaces,
        capture_output=True,
        check=False,
    )
    assert probe.returncode != 0, "the filter let a user namespace through"
    built = subprocess.run(
        [
            *(PACKAGER, "build", "models:/pyfunc-code/1", "--backend", "oci"),
            *("-t", tag, "--load", "--base-image", base_image, "--json"),
        ],
        preexec_fn=forbid_user_namespaces,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    trees = [_tree(image) for image in (pyfunc_code_image, tag)]
    docker_files, oci_files = trees
    assert len(docker_files) > 1000  # the whole root file system, not an empty listing
    missing = sorted(set(docker_files) - set(oci_files))
    extra = sorted(set(oci_files) - set(docker_files))
    changed = sorted(
        p for p in set(docker_files) & set(oci_files) if docker_files[p] != oci_files[p]
    )
    assert (missing, extra, changed[:20]) == ([], [], [])
    configs = [
        docker_client.images.get(image).attrs["Config"] for image in (pyfunc_code_image, tag)
    ]
    for key in ("User", "Entrypoint", "Env", "Labels", "ExposedPorts", "Healthcheck", "WorkingDir"):
        assert configs[0].get(key) == configs[1].get(key), key
    # One size for both backends: the file contents, as the engine counts them (which
    # counts symlinks the tar headers don't size: a few KB apart at most).
    report = json.loads(built.stdout)
    engine_sizes = [docker_client.images.get(i).attrs["Size"] for i in (pyfunc_code_image, tag)]
    assert abs(report["size_bytes"] - engine_sizes[1]) < 2**20, (report, engine_sizes)
    assert abs(engine_sizes[0] - engine_sizes[1]) < 2**20, engine_sizes
    assert report["layers_bytes"] > report["size_bytes"]  # tar headers and padding
    assert report["image_id"] == docker_client.images.get(tag).id
    docker_client.images.remove(tag, force=True)


def _tree(image: str) -> dict[str, list[Any]]:
    out = subprocess.run(
        ["docker", "run", "--rm", "--user", "0", "--entrypoint", "python", image, "-c", WALK],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return {row[0]: row[1:] for row in json.loads(out)}


@dataclass(frozen=True)
class SkBuilds:
    """sk-cloudpickle's OCI builds into one cache, shared by the two tests below."""

    cache: Path
    checked: dict[str, Any]  # --check-reproducible
    cold: dict[str, Any]  # the first build into the cache
    warm: dict[str, Any]  # the same build again
    other: dict[str, Any]  # version 1: the same lock


@pytest.fixture(scope="module")
def sk_builds(
    mlflow_server: MlflowServer,
    registered_models: Any,
    base_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> SkBuilds:
    root = tmp_path_factory.mktemp("sk-builds")
    cache, out = root / "cache", root / "image"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PACKAGER_CACHE_DIR": str(cache)}
    env.pop("MLFLOW_REGISTRY_URI", None)  # the test server is the registry, as registry_env says

    def build(model: str, *args: str) -> dict[str, Any]:
        argv = [PACKAGER, "build", model, "--backend", "oci", "--base-image", base_image]
        done = subprocess.run(
            [*argv, *args, "--json"],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
            env=env,
        )
        if done.returncode != 0:
            pytest.fail(f"{argv} failed:\n{done.stdout}\n{done.stderr[-4000:]}", pytrace=False)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return SkBuilds(
        cache=cache,
        checked=build("models:/sk-cloudpickle/2", "--check-reproducible"),
        cold=build("models:/sk-cloudpickle/2", "-o", str(out)),
        warm=build("models:/sk-cloudpickle/2", "-o", str(out)),
        other=build("models:/sk-cloudpickle/1", "-o", str(out)),
    )


def test_check_reproducible_and_warm_rebuild(sk_builds: SkBuilds) -> None:
    report = sk_builds.checked
    assert report["reproducible"] is True
    assert report["digests"][0] == report["digests"][1]
    assert report["first_difference"] is None

    # Warm rebuild with nothing changed: every layer from the cache, same digest.
    cold, warm = sk_builds.cold, sk_builds.warm
    assert cold["layers_written"] >= 1
    assert warm["layers_written"] == 0
    assert warm["manifest_digest"] == cold["manifest_digest"] == report["digests"][0]

    # A new version with the same lock rewrites only the model's own layers.
    other = sk_builds.other
    assert other["lock_digest"] == cold["lock_digest"]
    assert other["manifest_digest"] != cold["manifest_digest"]
    assert other["layers_written"] == 1  # the model layer; venv, server, code, artifacts reused


def test_load_sends_only_the_layers_the_engine_lacks(  # noqa: PLR0917 - pytest fixtures
    registry_env: MlflowServer,
    base_image: str,
    sk_builds: SkBuilds,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from packager.cli import main
    from packager.image import engine

    # The layers come from the cache the builds above wrote (what is sent to the engine
    # depends on the engine, not on the cache); building them again would cost CI 2 minutes.
    monkeypatch.setenv("PACKAGER_CACHE_DIR", str(sk_builds.cache))

    first, second = "packager-test/oci-load:2", "packager-test/oci-load:1"

    def build(model: str, tag: str) -> dict[str, Any]:
        assert main(["build", model, "--backend", "oci", "--base-image", base_image,
                     "-t", tag, "--load", "--json"]) == 0  # fmt: skip
        return dict(json.loads(capsys.readouterr().out))

    a = build("models:/sk-cloudpickle/2", first)
    # The engine has the base, so its layers stay out of the archive.
    base_layers = len(docker_client.images.get(base_image).attrs["RootFS"]["Layers"])
    assert 1 <= a["layers_loaded"] <= a["layers"] - base_layers
    # A new version with the same lock sends only what differs: the model's own layers.
    b = build("models:/sk-cloudpickle/1", second)
    assert b["lock_digest"] == a["lock_digest"]
    assert 1 <= b["layers_loaded"] < a["layers_loaded"]
    image = docker_client.images.get(second)
    assert image.id == b["image_id"]
    stack = tuple(image.attrs["RootFS"]["Layers"])
    # Complete: the venv it did not send is there, from the engine's own layers, and the
    # image serves its model.
    out = docker_client.containers.run(
        second,
        entrypoint=["python", "-c", "import mlflow.pyfunc, packager_server; print('ok')"],
        remove=True,
    )
    assert out.strip() == b"ok"
    assert main(["test", second, "--model", "models:/sk-cloudpickle/1"]) == 0
    capsys.readouterr()

    # The engine no longer has the model's layer but packager believes it does: the load
    # fails, and is retried with every layer.
    for tag in (first, second):
        docker_client.images.remove(tag, force=True)
    holders = [
        i.tags for i in docker_client.images.list() if stack[-1] in i.attrs["RootFS"]["Layers"]
    ]
    assert not holders, f"other images hold this model's layer: {holders}"
    monkeypatch.setattr(engine, "layer_stacks", lambda client, **_: [stack])  # noqa: ARG005
    c = build("models:/sk-cloudpickle/1", second)
    assert c["image_id"] == b["image_id"]
    assert c["layers_loaded"] == len(set(stack))
    assert docker_client.images.get(second).attrs["RootFS"]["Layers"] == list(stack)
    docker_client.images.remove(second, force=True)


def test_oci_refuses_what_it_cannot_do(
    registry_env: MlflowServer, base_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from packager.cli import main

    args = ["build", "models:/sk-cloudpickle/1", "--backend", "oci", "--base-image", base_image]
    assert main([*args, "--json"]) == 2  # nowhere to put the image
    assert "-o DIR" in json.loads(capsys.readouterr().out)["error"]["hint"]
    # -t alone loads into the engine; with none answering, the error names the other outputs.
    no_engine = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in no_engine.items():
            patch.setenv(key, value)
        assert main([*args, "-t", "x:1", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert "none answers" in error["message"]
    assert "--push" in error["hint"]
    assert main([*args, "--load", "--json"]) == 2  # --load needs a tag
    assert "-t IMAGE:TAG" in json.loads(capsys.readouterr().out)["error"]["hint"]
    code = main([*args, "-o", "x", "--system-package", "libgomp1", "--json"])
    assert code == 2
    assert "only the Docker backend" in json.loads(capsys.readouterr().out)["error"]["message"]
    docker = ["build", "models:/sk-cloudpickle/1", "--backend", "docker", "-t", "x:1"]
    assert main([*docker, "--load", "--json"]) == 2
    assert "--backend oci" in json.loads(capsys.readouterr().out)["error"]["hint"]


def _layout(directory: Path) -> tuple[list[str], list[str]]:
    """(layer digests, diff ids) of the image in an OCI layout."""
    blobs = directory / "blobs" / "sha256"
    index = json.loads((directory / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    return [layer["digest"] for layer in manifest["layers"]], config["rootfs"]["diff_ids"]


def test_bases_from_an_archive_and_a_registry(  # noqa: PLR0917 - pytest fixtures
    registry_env: MlflowServer,
    base_image: str,
    local_registry: str,
    docker_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same base from the engine, a docker-archive or a registry: the same layers."""
    from packager.cli import main

    model = "models:/params-model/1"
    args = ["build", model, "--backend", "oci", "--json"]
    assert main([*args, "--base-image", base_image, "-o", str(tmp_path / "engine")]) == 0
    capsys.readouterr()

    archive = tmp_path / "base.tar"
    subprocess.run(["docker", "save", "-o", str(archive), base_image], check=True, timeout=300)
    from_archive = ["--base-image", f"docker-archive:{archive}", "-o", str(tmp_path / "archive")]
    assert main([*args, *from_archive]) == 0
    capsys.readouterr()

    pushed = f"{local_registry}/bases/test-base:3.11"
    docker_client.images.get(base_image).tag(pushed)
    assert main(["push", pushed]) == 0
    capsys.readouterr()
    tag = "packager-test/oci-registry-base:1"
    from_registry = ["--base-image", f"docker://{pushed}", "-o", str(tmp_path / "registry")]
    assert main([*args, *from_registry, "-t", tag, "--load"]) == 0
    capsys.readouterr()

    engine_layers, engine_diffs = _layout(tmp_path / "engine")
    archive_layers, archive_diffs = _layout(tmp_path / "archive")
    registry_layers, registry_diffs = _layout(tmp_path / "registry")
    assert archive_layers == engine_layers  # docker save gives the same uncompressed layers
    assert registry_diffs == archive_diffs == engine_diffs  # the same content everywhere
    # packager's layers are the same blobs. (The base layer's blob may be compressed or not:
    # the engine's push reuses a blob the registry already has for the same content.)
    assert registry_layers[1:] == engine_layers[1:]
    assert main(["test", tag, "--model", model]) == 0
    assert "passed" in capsys.readouterr().out
    docker_client.images.remove(tag, force=True)
    docker_client.images.remove(pushed, force=True)


def test_the_default_base_is_pulled_from_a_mirror_without_an_engine(
    registry_env: MlflowServer,
    base_image: str,
    local_registry: str,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    """No --base-image and no engine (a CI runner without a daemon): the default base,
    python:3.11-slim, comes from its registry by digest; PACKAGER_BASE_REGISTRY points
    Docker Hub names at a mirror (here the local registry holding our base under that name)."""
    mirrored = f"{local_registry}/library/python:3.11-slim"
    docker_client.images.get(base_image).tag(mirrored)
    subprocess.run(["docker", "push", mirrored], check=True, capture_output=True, timeout=600)
    docker_client.images.remove(mirrored)
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}",
        "PACKAGER_BASE_REGISTRY": local_registry,
        "PACKAGER_CACHE_DIR": str(tmp_path / "cache"),
    }
    built = subprocess.run(
        [PACKAGER, "build", "models:/params-model/1", "-o", str(tmp_path / "image"), "--json"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    assert f"pulling docker://{mirrored}" in built.stderr
    blobs = tmp_path / "image" / "blobs" / "sha256"
    index = json.loads((tmp_path / "image" / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    labels = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())["config"]["Labels"]
    assert labels["org.opencontainers.image.base.name"] == "python:3.11-slim"  # not the mirror
    pushed = _manifest_digest(local_registry, "library/python", "3.11-slim")
    assert labels["org.opencontainers.image.base.digest"] == pushed


def _manifest_digest(address: str, repository: str, tag: str) -> str:
    import urllib.request

    request = urllib.request.Request(
        f"http://{address}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
            "application/vnd.oci.image.manifest.v1+json"
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(answer.headers["Docker-Content-Digest"])
