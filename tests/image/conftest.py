"""Fixtures for image tests: the Docker engine and a base image built from Debian's packages."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, unavailable, wait_for_http

BASE = "packager-test-base:3.11"


@pytest.fixture(scope="session")
def docker_client() -> Any:
    from packager.errors import DockerUnavailableError
    from packager.image import engine

    try:
        return engine.connect()
    except DockerUnavailableError as err:
        unavailable(str(err))
        raise


# What image tests tag: their own images, and images pulled back from test registries.
TEST_PREFIXES = ("packager-test/", "127.0.0.1:")


@pytest.fixture(scope="session", autouse=True)
def remove_test_images(docker_client: Any) -> Iterator[None]:
    """Remove what image tests tagged, so repeated runs don't fill the disk.

    Each model image is close to 1 GB; left behind, a few CI runs fill a small disk. The
    base image (packager-test-base, built once per machine) stays. Don't run two image
    test sessions on one engine at once: the first to end removes the other's images.
    """
    yield
    for image in docker_client.images.list():
        for tag in image.tags:
            if tag.startswith(TEST_PREFIXES):
                with contextlib.suppress(Exception):
                    docker_client.images.remove(tag)
    with contextlib.suppress(Exception):
        docker_client.images.prune(filters={"dangling": True})


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    """Built once per machine with mmdebstrap (reused when the tag exists)."""
    from packager.errors import ToolMissingError
    from packager.image.base import build_base
    from packager.runner import find_tool

    try:
        find_tool("mmdebstrap", install_hint="apt-get install mmdebstrap")
    except ToolMissingError as err:
        unavailable(str(err))
    return build_base("3.11", BASE, client=docker_client).reference


@contextlib.contextmanager
def registry(root: Path, *, readonly: bool = False) -> Iterator[str]:
    """Debian's docker-registry (the CNCF distribution registry) on a free loopback port."""
    exe = shutil.which("docker-registry")
    if exe is None:
        unavailable("docker-registry is not installed (apt-get install docker-registry)")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    maintenance = "  maintenance:\n    readonly:\n      enabled: true\n" if readonly else ""
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
        f"{maintenance}http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(exe), "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", 30, process, log)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def forbid_user_namespaces() -> None:
    """A ``preexec_fn``: this process and all it starts can create no user namespace, as in
    a pod under the default seccomp profile or on a runner whose AppArmor policy forbids
    them. A seccomp filter (x86-64) answers EPERM to unshare and clone with CLONE_NEWUSER,
    and ENOSYS to clone3 (whose flags a filter cannot read), as Docker's default profile
    does. Only the build is restricted: the machine's sysctl is not touched."""
    import ctypes
    import struct

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, errno = 0x7FFF0000, 0x00050000
    program = b"".join(
        [
            op(ld, 4),  # arch
            op(jeq, 0xC000003E, jt=1),  # x86-64
            op(ret, allow),
            op(ld, 0),  # syscall number
            op(jeq, 435, jf=1),  # clone3
            op(ret, errno | 38),  # ENOSYS: glibc falls back to clone
            op(jeq, 272, jt=2),  # unshare
            op(jeq, 56, jt=1),  # clone
            op(ret, allow),
            op(ld, 16),  # args[0], low 32 bits: the flags
            op(jset, 0x10000000, jf=1),  # CLONE_NEWUSER
            op(ret, errno | 1),  # EPERM
            op(ret, allow),
        ]
    )
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


@pytest.fixture(scope="session")
def pyfunc_code_image(
    mlflow_server: Any,
    registered_models: Any,
    base_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """The code-and-artifacts model, built once per session."""
    tag = "packager-test/pyfunc-code:1"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("packager")),
            "build",
            "models:/pyfunc-code/1",
            "--backend",
            "docker",
            "-t",
            tag,
            "--base-image",
            base_image,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow_server.uri,
            "PACKAGER_CACHE_DIR": str(tmp_path_factory.mktemp("image-cache")),
        },
    )
    if result.returncode != 0:
        pytest.fail(
            f"building {tag} failed:\n{result.stdout}\n{result.stderr[-4000:]}", pytrace=False
        )
    return tag
