"""Base images built from Debian's packages, for engines that can't pull (air-gapped sites).

``mmdebstrap`` writes a minimal Debian root file system with the Python the model needs,
then the engine imports it. Debian ships one Python per release, so the Python minor
decides the suite: 3.11 is bookworm, 3.13 trixie. The image has a non-root user
(``model``, uid 10001) for the server, and no ``/etc/resolv.conf`` or ``/etc/hostname``
from the build machine. With the same mirror snapshot and ``SOURCE_DATE_EPOCH``,
mmdebstrap writes the same tar, and the image is loaded with a config whose times are
that epoch: two builds give the same image id, not just the same layer.

An existing tag is reused only if its ``io.packager.base.recipe`` label matches this
recipe (packages, hooks, suite, epoch), so a changed recipe is never hidden by an old
image under the same tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import UsageError
from packager.image import engine
from packager.runner import find_tool, run

log = logging.getLogger(__name__)

SUITES = {"3.11": "bookworm", "3.13": "trixie"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
USER_ID = 10001
# Reproducible rootfs: the epoch of the packager release that defined this recipe.
DEFAULT_EPOCH = 1767225600  # 2026-01-01T00:00:00Z
PACKAGES = ("python3", "python3-venv", "ca-certificates", "libgomp1")
_REFERENCE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
)


def validate_reference(reference: str) -> str:
    """Reject an invalid image name or tag before anything is built."""
    if len(reference) > 255 or not _REFERENCE.match(reference):
        raise UsageError(
            f"{reference!r} is not a valid image reference",
            hint="use [REGISTRY[:PORT]/]NAME[:TAG] with a lower-case name, e.g. "
            "registry.example.com/team/wine:3",
        )
    return reference


@dataclass(frozen=True, kw_only=True)
class BaseImage:
    reference: str
    image_id: str
    python: str
    suite: str
    built: bool  # False when it already existed


def suite_for(python: str) -> str:
    minor = ".".join(python.split(".")[:2])
    suite = SUITES.get(minor)
    if suite is None:
        shipped = ", ".join(f"{v} ({s})" for v, s in SUITES.items())
        raise UsageError(
            f"no Debian release ships Python {minor} (Debian ships {shipped})",
            hint="use --base-image with an image that has this Python (e.g. python:"
            f"{minor}-slim), or lock the model for a Python Debian ships",
        )
    return suite


RECIPE_LABEL = "io.packager.base.recipe"
# Bump when build_base changes what it puts in the root file system.
RECIPE_FORMAT = "2"


def _recipe(suite: str, packages: tuple[str, ...], hooks: tuple[str, ...], epoch: int) -> str:
    material = json.dumps(
        [RECIPE_FORMAT, suite, sorted(packages), list(hooks), epoch, bool(_merged_usr_hooks())]
    )
    return "sha256:" + hashlib.sha256(material.encode()).hexdigest()


def _merged_usr_hooks() -> list[str]:
    """Set up merged /usr with mmdebstrap's own hook instead of the usrmerge package.

    Without it, apt satisfies init-system-helpers' "usrmerge | usr-is-merged" with
    usrmerge, which pulls in perl: ~46 MB of the image that nothing in it uses.
    """
    hooks = Path("/usr/share/mmdebstrap/hooks/merged-usr")
    return [f"--hook-dir={hooks}"] if (hooks / "setup00.sh").is_file() else []


def build_base(
    python: str,
    reference: str,
    *,
    mirror: str = DEFAULT_MIRROR,
    epoch: int = DEFAULT_EPOCH,
    rebuild: bool = False,
    client: Any | None = None,
    packages: tuple[str, ...] = PACKAGES,
    hooks: tuple[str, ...] = (),
) -> BaseImage:
    """Build (or reuse) ``reference`` as a Debian base with Python ``python``.

    ``packages`` and ``hooks`` (mmdebstrap customize hooks, ``$1`` is the root) let the
    benchmarks build a stand-in for other bases; packager's own base uses the defaults.
    """
    validate_reference(reference)
    suite = suite_for(python)
    minor = ".".join(python.split(".")[:2])
    client = client or engine.connect()
    recipe = _recipe(suite, packages, hooks, epoch)
    if not rebuild and engine.image_exists(client, reference):
        image = client.images.get(reference)
        if (image.labels or {}).get(RECIPE_LABEL) == recipe:
            return BaseImage(
                reference=reference, image_id=str(image.id), python=minor, suite=suite, built=False
            )
        log.info("%s was built by another recipe: building it again", reference)
    mmdebstrap = find_tool("mmdebstrap", install_hint="apt-get install mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="packager-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        customize = [
            (
                f'chroot "$1" useradd --system --uid {USER_ID} --user-group --no-create-home '
                "--shell /usr/sbin/nologin model"
            ),
            'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
            *hooks,
        ]
        argv = [
            mmdebstrap,
            "--variant=apt",
            "--mode=root",
            f"--include={','.join(packages)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            *_merged_usr_hooks(),
            *(f"--customize-hook={hook}" for hook in customize),
            suite,
            str(rootfs),
            mirror,
        ]
        log.info(
            "building the base image %s: Debian %s with Python %s (mmdebstrap)",
            reference,
            suite,
            minor,
        )
        run(
            argv,
            what="building the base root file system with mmdebstrap",
            env={"SOURCE_DATE_EPOCH": str(epoch)},
            timeout=1800,
        )
        image_id = engine.load_rootfs(
            client,
            rootfs,
            reference,
            config={
                "Env": ["LANG=C.UTF-8"],
                "Labels": {
                    "org.opencontainers.image.title": f"Debian {suite} with Python {minor}",
                    "io.packager.base.python": minor,
                    "io.packager.base.suite": suite,
                    RECIPE_LABEL: recipe,
                },
            },
            epoch=epoch,
            created_by=f"packager base build --python {minor} (mmdebstrap, Debian {suite})",
        )
    return BaseImage(reference=reference, image_id=image_id, python=minor, suite=suite, built=True)
