"""packager: turn an MLflow registered model version into a serving image.

Stages (see ARCHITECTURE.md): source -> spec -> env -> stage -> image -> publish -> verify.
The public library entry points are in :mod:`packager.api`.
"""

__version__ = "0.1.0"
