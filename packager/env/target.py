"""The image a lock is made for: Python version and platform, whatever the host."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from typing import Literal

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from packager.errors import UsageError

Platform = Literal["linux/amd64", "linux/arm64"]
PLATFORMS: tuple[Platform, ...] = ("linux/amd64", "linux/arm64")
_ARCH = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
# The base images are Debian bookworm (glibc 2.36): wheels for any manylinux up to 2.36
# run there. Targeting an older glibc would pass over current wheels (cryptography, for
# one, ships manylinux_2_34 wheels only) and fall back to sdists.
GLIBC = (2, 36)
# The Pythons an image can have: packager_server needs 3.10 (dataclass kw_only, zip
# strict), and 3.14 is the newest CPython released with wheels for MLflow's stack.
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")


@dataclass(frozen=True, kw_only=True)
class Target:
    python: str  # major.minor, e.g. "3.11"
    python_full: str | None = None  # the model's exact version, recorded in the lock
    platform: Platform = "linux/amd64"

    @classmethod
    def make(cls, python: str, platform_name: str = "linux/amd64") -> Target:
        parts = python.split(".")
        if len(parts) < 2 or not all(p.isdigit() for p in parts[:3]):
            raise UsageError(f"{python!r} is not a Python version", hint="use e.g. 3.11")
        minor = ".".join(parts[:2])
        if minor not in PYTHONS:
            raise UsageError(
                f"Python {python} is not a Python an image can have: the scoring server runs "
                f"on {PYTHONS[0]} to {PYTHONS[-1]}",
                hint=f"pass --python {PYTHONS[1]} (or another of {', '.join(PYTHONS)}); a model "
                "logged with an older Python usually loads on a newer one, and MLflow warns "
                "when it may not",
            )
        chosen = next((p for p in PLATFORMS if p == platform_name), None)
        if chosen is None:
            raise UsageError(
                f"unsupported platform {platform_name!r}",
                hint=f"use one of: {', '.join(PLATFORMS)}",
            )
        return cls(
            python=".".join(parts[:2]),
            python_full=python if len(parts) > 2 else None,
            platform=chosen,
        )

    @property
    def arch(self) -> str:
        return _ARCH[self.platform]

    @property
    def uv_platform(self) -> str:
        """uv's --python-platform value."""
        return f"{self.arch}-manylinux_{GLIBC[0]}_{GLIBC[1]}"

    @property
    def cpython_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    @property
    def pip_platforms(self) -> tuple[str, ...]:
        """Every platform tag pip must be told about (it does not expand manylinux_2_x)."""
        newest = [f"manylinux_{GLIBC[0]}_{minor}_{self.arch}" for minor in range(GLIBC[1], 16, -1)]
        legacy = [f"manylinux2014_{self.arch}"]
        if self.arch == "x86_64":
            legacy += ["manylinux2010_x86_64", "manylinux1_x86_64"]
        return (*newest, *legacy)

    def supported_tags(self) -> frozenset[Tag]:
        """Every wheel tag an interpreter of this target accepts (CPython only)."""
        version = tuple(int(p) for p in self.python.split("."))
        platforms = list(self.pip_platforms)
        return frozenset(
            [
                *cpython_tags(
                    version, abis=[self.cpython_tag, "abi3", "none"], platforms=platforms
                ),
                *compatible_tags(version, interpreter=self.cpython_tag, platforms=platforms),
            ]
        )

    def accepts_wheel(self, filename: str) -> bool:
        """True when a wheel of this file name installs on the target."""
        try:
            _, _, _, tags = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            return False
        return not tags.isdisjoint(self.supported_tags())

    def matches_host(self) -> bool:
        """True when this interpreter could stand for the image (pip-tools' requirement)."""
        host_python = f"{sys.version_info.major}.{sys.version_info.minor}"
        machine = platform.machine().lower()
        host_arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        return sys.platform == "linux" and host_python == self.python and host_arch == self.arch

    def describe(self) -> str:
        return f"Python {self.python_full or self.python} on {self.platform}"
