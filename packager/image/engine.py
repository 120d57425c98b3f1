"""The one door to the Docker engine (docker-py): connect, build, import, run, remove.

Every call turns docker-py's exceptions into packager's errors; nothing else in packager
imports docker.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import DockerUnavailableError, ImageBuildError, ImageNotFoundError

log = logging.getLogger(__name__)


def connect() -> Any:
    """A docker-py client for the engine, or a clear error with the DOCKER_HOST hint."""
    import docker  # noqa: PLC0415 - imported only where the engine is used
    from docker.errors import DockerException  # noqa: PLC0415

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except DockerException as err:
        raise DockerUnavailableError(
            f"cannot reach the Docker engine at {host}: {err}",
            hint="start the Docker daemon, or point DOCKER_HOST at it "
            "(e.g. unix:///var/run/docker.sock or tcp://host:2375)",
        ) from err
    return client


def image_exists(client: Any, reference: str) -> bool:
    from docker.errors import ImageNotFound  # noqa: PLC0415

    try:
        client.images.get(reference)
    except ImageNotFound:
        return False
    return True


def load_rootfs(
    client: Any,
    tarball: Path,
    reference: str,
    *,
    config: dict[str, Any],
    epoch: int,
    created_by: str,
) -> str:
    """Load a root file system tar as a one-layer image, tagged ``reference``.

    Unlike ``docker import`` (which stamps the current time into the image config), the
    config here holds only ``epoch``, so the image id depends on nothing but the tar and
    ``config``: the same root file system gives the same id on any machine.
    """
    import datetime  # noqa: PLC0415
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415
    import platform  # noqa: PLC0415
    import tarfile  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    digest = hashlib.sha256()
    with tarball.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    diff_id = "sha256:" + digest.hexdigest()
    when = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    machine = platform.machine().lower()
    image_config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine),
        "os": "linux",
        "created": when,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": when, "created_by": created_by}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": None, "Layers": [f"{diff_id[7:]}/layer.tar"]}]
    with tempfile.TemporaryDirectory(prefix="packager-base-load-", dir=tarball.parent) as tmp:
        archive = Path(tmp) / "image.tar"
        with tarfile.open(archive, "w") as out:
            out.add(tarball, arcname=f"{diff_id[7:]}/layer.tar")
            for name, payload in (
                (config_name, config_bytes),
                ("manifest.json", json.dumps(manifest).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = epoch
                out.addfile(info, io.BytesIO(payload))
        loaded = load(client, archive)
    image_id = "sha256:" + config_name.removesuffix(".json")
    if image_id not in loaded:
        raise ImageBuildError(f"the engine loaded {loaded}, not the base image {image_id}")
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        repository, tag = reference, "latest"
    client.images.get(image_id).tag(repository, tag)
    return image_id


def build(client: Any, context: Path) -> Iterator[str]:
    """Build ``context``; yields log lines, then the image id as ``"id:" + id``.

    The image is built untagged: the caller tags it only after the build succeeded, so a
    failed or interrupted build never leaves a tag behind.
    """
    from docker.errors import APIError  # noqa: PLC0415

    image_id = None
    last: list[str] = []
    try:
        stream = client.api.build(path=str(context), rm=True, forcerm=True, pull=False, decode=True)
        for chunk in stream:
            if "error" in chunk:
                raise ImageBuildError(
                    "the image build failed: " + str(chunk["error"]).strip(),
                    hint="the build log above shows the failing step",
                )
            text = str(chunk.get("stream", "")).rstrip()
            if text:
                last = [*last[-20:], text]
                yield text
            aux = chunk.get("aux") or {}
            if "ID" in aux:
                image_id = str(aux["ID"])
    except APIError as err:
        raise ImageBuildError(f"the Docker engine refused the build: {err.explanation}") from err
    if image_id is None:
        raise ImageBuildError("the build ended without an image id:\n" + "\n".join(last))
    yield "id:" + image_id


@dataclass(frozen=True)
class BaseInfo:
    image_id: str
    python: str | None  # major.minor, when it can be told
    digest: str = ""  # the registry digest it was pulled by, else its image id
    platform: str = ""  # "os/architecture" from the image's config, when it says


def image_digest(image: Any) -> str:
    """What pins an engine's image: the manifest digest it came from, else its id."""
    return digest_from_attrs(image.attrs)


def digest_from_attrs(attrs: dict[str, Any]) -> str:
    digests = attrs.get("RepoDigests") or []
    return str(digests[0]).split("@", 1)[1] if digests else str(attrs["Id"])


def base_python(client: Any, reference: str) -> BaseInfo:
    """The base image's id and Python minor (from its labels, its env, or by asking it)."""
    from docker.errors import ImageNotFound  # noqa: PLC0415

    try:
        image = client.images.get(reference)
    except ImageNotFound as err:
        raise ImageBuildError(
            f"the base image {reference} is not in the local engine, and packager does not "
            "pull during a build",
            hint="pull it first (docker pull), or build one from Debian's packages with "
            "`packager base build --python X.Y -t TAG`",
        ) from err
    config = image.attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    digest = image_digest(image)
    os_name, arch = image.attrs.get("Os"), image.attrs.get("Architecture")
    platform = f"{os_name}/{arch}" if os_name and arch else ""
    if labels.get("io.packager.base.python"):
        return BaseInfo(str(image.id), str(labels["io.packager.base.python"]), digest, platform)
    for entry in config.get("Env") or []:
        if entry.startswith("PYTHON_VERSION="):  # the official python images
            minor = ".".join(entry.split("=", 1)[1].split(".")[:2])
            return BaseInfo(str(image.id), minor, digest, platform)
    try:
        out = client.containers.run(
            image.id,
            ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            remove=True,
        )
    except Exception as err:
        raise ImageBuildError(
            f"the base image {reference} has no python3 that runs",
            hint="use a base image with Python",
        ) from err
    return BaseInfo(str(image.id), out.decode().strip(), digest, platform)


def tag(client: Any, image_id: str, reference: str) -> None:
    repository, _, name = reference.rpartition(":")
    if not repository or "/" in name:
        repository, name = reference, "latest"
    client.images.get(image_id).tag(repository, name)


def layer_stacks(
    client: Any, *, references: Sequence[str], labels: dict[str, str]
) -> list[tuple[str, ...]]:
    """The layer stacks (``RootFS.Layers``, diff ids) of images the engine holds.

    Those named in ``references`` (missing ones are skipped) and those carrying every label
    in ``labels``. A stack means the engine has each of its prefixes as a layer chain.
    """
    from docker.errors import DockerException  # noqa: PLC0415

    images = []
    for reference in references:
        try:
            images.append(client.images.get(reference))
        except DockerException:
            continue
    if labels:
        wanted = [f"{key}={value}" for key, value in labels.items()]
        try:
            images += client.images.list(filters={"label": wanted})
        except DockerException as err:
            log.debug("could not list images by label: %s", err)
    stacks = []
    for image in images:
        layers = (image.attrs.get("RootFS") or {}).get("Layers") or []
        stacks.append(tuple(str(layer) for layer in layers))
    return stacks


def load(client: Any, archive: Path) -> list[str]:
    """``docker load``: the ids of the images the archive held."""
    from docker.errors import APIError, ImageLoadError  # noqa: PLC0415

    try:
        with archive.open("rb") as data:
            images = client.images.load(data)
    except APIError as err:
        raise ImageBuildError(f"the engine refused to load the image: {err.explanation}") from err
    except ImageLoadError as err:  # the engine reported an error in its progress stream
        raise ImageBuildError(f"the engine could not load the image: {err}") from err
    return [str(image.id) for image in images]


def image_labels(client: Any, reference: str) -> dict[str, str]:
    """The labels of ``reference`` in the engine; a missing image or an invalid reference
    is an :class:`ImageNotFoundError` saying which."""
    from docker.errors import APIError, ImageNotFound  # noqa: PLC0415

    try:
        image = client.images.get(reference)
    except ImageNotFound as err:
        raise ImageNotFoundError(
            f"{reference} is not in the local Docker engine",
            hint="build it (packager build MODEL -t IMAGE:TAG) or pull it (docker pull) first",
        ) from err
    except APIError as err:  # the engine rejects the reference itself
        raise ImageNotFoundError(
            f"{reference!r} is not a valid image reference: {err.explanation or err}",
            hint="use NAME:TAG, an image id, or REGISTRY/REPO@sha256:DIGEST",
        ) from err
    return dict(image.labels or {})


def read_image_file(client: Any, reference: str, path: str) -> bytes | None:
    """The bytes of one file of an image (from a created, never started, container), or
    None when the image has no such file."""
    import tarfile  # noqa: PLC0415

    from docker.errors import NotFound  # noqa: PLC0415

    container = client.containers.create(reference, entrypoint=["true"], network_mode="none")
    try:
        try:
            stream, _ = container.get_archive(path)
        except NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.next()
            handle = archive.extractfile(member) if member is not None else None
            return handle.read() if handle is not None else None
    finally:
        container.remove(force=True)


def run_once(
    client: Any,
    reference: str,
    argv: list[str],
    *,
    files: dict[str, bytes],
    timeout: float,
) -> tuple[int, str, str]:
    """Run ``argv`` (the entrypoint replaced) in a container of ``reference`` with no
    network, after copying ``files`` (absolute path → bytes, readable by any user) into
    it; returns (exit status, stdout, stderr). The container is always removed."""
    import tarfile  # noqa: PLC0415

    container = client.containers.create(
        reference, entrypoint=argv[:1], command=argv[1:], network_mode="none"
    )
    try:
        if files:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                folders = sorted({str(Path(p).parent) for p in files})
                for folder in folders:
                    info = tarfile.TarInfo(folder.lstrip("/"))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    archive.addfile(info)
                for path, data in sorted(files.items()):
                    info = tarfile.TarInfo(path.lstrip("/"))
                    info.size, info.mode = len(data), 0o644
                    archive.addfile(info, io.BytesIO(data))
            container.put_archive("/", buffer.getvalue())
        container.start()
        status = container.wait(timeout=timeout)
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return int(status.get("StatusCode", 1)), stdout, stderr
    finally:
        container.remove(force=True)


def memory_bytes(container: Any) -> int | None:
    """A running container's memory in use, as ``docker stats`` counts it (without the
    inactive page cache), or None if the engine reports none."""
    stats = container.stats(stream=False).get("memory_stats") or {}
    usage = stats.get("usage")
    if usage is None:
        return None
    details = stats.get("stats") or {}
    cache = details.get("inactive_file", details.get("total_inactive_file", 0))
    return int(usage) - int(cache)


def inspect_image_quickly(reference: str) -> dict[str, Any] | None:
    """The engine's ``GET /images/{name}/json`` over its Unix socket, without docker-py.

    docker-py (and the requests stack under it) takes ~0.3 s to import; a warm OCI build
    only needs to know which image a base tag names now, so it asks the socket directly.
    Returns None when the engine is not on a local socket or does not answer; callers
    then use docker-py.
    """
    import json  # noqa: PLC0415
    import urllib.parse  # noqa: PLC0415

    answer = _quick_get(f"/images/{urllib.parse.quote(reference, safe='')}/json")
    if answer is None or answer[0] != 200:
        return None
    data: dict[str, Any] = json.loads(answer[1])
    return data


def reachable() -> bool:
    """Whether an engine answers at DOCKER_HOST (its socket asked directly when local)."""
    if os.environ.get("DOCKER_HOST", "unix://").startswith("unix://"):
        answer = _quick_get("/_ping")
        return answer is not None and answer[0] == 200
    try:
        connect()
    except DockerUnavailableError:
        return False
    return True


def _quick_get(path: str) -> tuple[int, bytes] | None:
    """``GET path`` on the engine's Unix socket: (status, body), or None if no answer."""
    import http.client  # noqa: PLC0415
    import socket  # noqa: PLC0415

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    socket_path = host.removeprefix("unix://")

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(socket_path)

    connection = _UnixConnection("localhost", timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        connection.close()
