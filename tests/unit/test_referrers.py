"""Attestations found through the OCI 1.1 referrers API when their tag is gone.

Debian's docker-registry (distribution 2.8, which the image tests use) has no referrers
API, so the tag path is what the end-to-end tests cover; this unit test serves the
referrers API from a minimal in-process registry to cover the other path."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from packager import publish
from packager.errors import PushError


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


CONFIG = json.dumps({"config": {"Labels": {"io.packager.model.name": "wine"}}}).encode()
IMAGE = json.dumps({"schemaVersion": 2, "config": {"digest": _digest(CONFIG)}, "layers": []})
IMAGE_DIGEST = _digest(IMAGE.encode())
DOCUMENT = b'{"bomFormat":"CycloneDX"}'


def _artifact(kind: str, subject: str, annotated: bool) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "artifactType": publish.ATTESTATION_TYPES[kind],
        "layers": [{"digest": _digest(DOCUMENT)}],
        "subject": {"digest": subject},
    }
    if annotated:
        manifest["annotations"] = {publish.ATTESTATION_ANNOTATION: kind}
    return json.dumps(manifest).encode()


OURS = _artifact("sbom", IMAGE_DIGEST, annotated=True)
FOREIGN = _artifact("sbom", IMAGE_DIGEST, annotated=False)  # another tool's SBOM


class _Registry(BaseHTTPRequestHandler):
    referrers = True
    manifests: ClassVar[dict[str, bytes]] = {
        IMAGE_DIGEST: IMAGE.encode(),
        _digest(OURS): OURS,
        _digest(FOREIGN): FOREIGN,
    }
    blobs: ClassVar[dict[str, bytes]] = {_digest(CONFIG): CONFIG, _digest(DOCUMENT): DOCUMENT}

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        kind, _, ref = path.removeprefix("/v2/wine/").partition("/")
        body = None
        if kind == "manifests":
            body = self.manifests.get(ref)
        elif kind == "blobs":
            body = self.blobs.get(ref)
        elif kind == "referrers" and self.referrers and ref == IMAGE_DIGEST:
            listed = [
                {
                    "digest": _digest(m),
                    "artifactType": json.loads(m)["artifactType"],
                    **({"annotations": json.loads(m)["annotations"]} if b"annot" in m else {}),
                }
                for m in (FOREIGN, OURS)
            ]
            body = json.dumps({"schemaVersion": 2, "manifests": listed}).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    _Registry.manifests = {
        IMAGE_DIGEST: IMAGE.encode(),
        _digest(OURS): OURS,
        _digest(FOREIGN): FOREIGN,
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_without_its_tag_the_attestation_is_found_by_referrers(
    registry: str, tmp_path: Path
) -> None:
    _Registry.referrers = True
    fetched = publish.fetch_attestations(f"{registry}/wine@{IMAGE_DIGEST}", ("sbom",), tmp_path)
    assert fetched.documents["sbom"] == DOCUMENT
    # packager's own (annotated) artifact, not the other tool's of the same type
    assert fetched.references["sbom"] == f"{registry}/wine@{_digest(OURS)}"
    assert fetched.labels == {"io.packager.model.name": "wine"}


def test_without_tag_or_referrers_api_the_error_names_the_tag(
    registry: str, tmp_path: Path
) -> None:
    _Registry.referrers = False
    with pytest.raises(PushError, match=r"sha256-[0-9a-f]{64}\.sbom"):
        publish.fetch_attestations(f"{registry}/wine@{IMAGE_DIGEST}", ("sbom",), tmp_path)
