"""``packager rebuild`` of a released image: its provenance (pushed next to it by
``packager release``) is enough to build it again from empty caches, to the same digest.

It rebuilds the two images test_release.py released (each version's ``packager.image`` tag
names it); run alone, it releases that version first. The rebuild is a real one: a new cache
directory, the lock read from the provenance, the wheels downloaded again, the base
taken from the engine and checked against the recorded digest.
"""

from __future__ import annotations

import json
import os

import pytest

from packager import publish, record
from packager.cli import main
from tests.image.test_release import MODELS

pytestmark = [pytest.mark.docker, pytest.mark.mlflow_server, pytest.mark.slow]


def _released(
    name: str,
    version: str,
    local_registry: str,
    base_image: str,
    capsys: pytest.CaptureFixture[str],
) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    image = client.get_model_version(name, version).tags.get(record.IMAGE_TAG, "")
    if image.startswith(f"{local_registry}/") and publish.manifest_exists(image):
        return str(image)
    argv = ["release", f"models:/{name}/{version}", "-t", f"{local_registry}/released"]
    assert main([*argv, "--base-image", base_image, "--no-test", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["releases"]
    return str(report["image"])


@pytest.mark.parametrize(("name", "version"), list(MODELS.items()))
@pytest.mark.usefixtures("registry_env")
def test_a_released_image_rebuilds_to_its_digest(
    name: str,
    version: str,
    local_registry: str,
    base_image: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = _released(name, version, local_registry, base_image, capsys)
    digest = image.partition("@")[2]
    code = main(["rebuild", image, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out["first_difference"]
    assert out["reproducible"] is True
    assert out["rebuilt"] == digest
    assert out["first_difference"] is None
    assert out["model"] == f"models:/{name}/{version}"
    assert out["base"] == base_image
    assert out["base_digest"].startswith("sha256:")

    # Not pinned by digest, or pinned to something that has no provenance: clear errors.
    assert main(["rebuild", image.partition("@")[0] + f":{name}-{version}"]) == 2
    assert "not pinned by digest" in capsys.readouterr().err
    missing = image.partition("@")[0] + "@sha256:" + "0" * 64
    assert main(["rebuild", missing]) == 26
    assert "no provenance could be read" in capsys.readouterr().err
