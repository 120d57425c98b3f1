"""``python -m packager``."""

from packager.cli import entrypoint

entrypoint()
