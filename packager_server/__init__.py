"""packager_server: the pyfunc scoring server that runs inside packager's images.

A drop-in for MLflow's scoring server (same endpoints, formats, status codes and
predictions), built for production: a pre-fork supervisor that loads the model once and
shares it with N workers, readiness separate from liveness, request timeouts that free
the worker, payload limits, JSON errors that never echo request data, access logs,
request ids and Prometheus metrics.

It imports nothing from ``packager``: images ship this package alone, with its own small
dependency set (MLflow for loading the model, uvicorn for HTTP).
"""

__version__ = "0.1.0"

# What the server needs besides the model's own requirements (which always pin mlflow).
# packager locks these together with the model's, so a conflict is found before building.
REQUIREMENTS = (
    "mlflow-skinny>=2.9",
    "uvicorn>=0.30",
    "httptools>=0.6",
    "uvloop>=0.19; sys_platform != 'win32'",
)
