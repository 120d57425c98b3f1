"""Server settings from flags and environment variables (flags win).

=========================  ==========================================  ==================
flag                       environment (first set wins)                default
=========================  ==========================================  ==================
``--model-dir``            PACKAGER_MODEL_DIR                          (required)
``--host``                 PACKAGER_HOST                               0.0.0.0
``--port``                 SAGEMAKER_BIND_TO_PORT, AIP_HTTP_PORT,      8080 (SageMaker's)
                           PORT, PACKAGER_PORT
``--workers``              PACKAGER_WORKERS, MLFLOW_MODELS_WORKERS,    container CPU limit
                           SAGEMAKER_MODEL_SERVER_WORKERS
``--timeout``              PACKAGER_TIMEOUT,                           120 s (Databricks)
                           MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
                           SAGEMAKER_MODEL_SERVER_TIMEOUT
(none)                     AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE         (Vertex AI routes off)
``--max-payload``          PACKAGER_MAX_PAYLOAD (bytes)                16 MiB (Databricks)
``--graceful-timeout``     PACKAGER_GRACEFUL_TIMEOUT                   30 s
``--header-timeout``       PACKAGER_HEADER_TIMEOUT                     5 s
``--log-format``           PACKAGER_LOG_FORMAT (text | json)           text
``--no-access-log``        PACKAGER_ACCESS_LOG=0                       access log on
``--no-fast-path``         PACKAGER_FAST_PATH=0                        fast path on
``--debug``                PACKAGER_DEBUG=1                            off
``--model-name``           PACKAGER_MODEL_NAME                         registered_model_meta
``--model-version``        PACKAGER_MODEL_VERSION                      registered_model_meta
``--serving-mode``         PACKAGER_SERVING_MODE (auto|fork|spawn)     auto
=========================  ==========================================  ==================

The port: the platforms' variables come before ``PACKAGER_PORT`` (which images set to
8080), because each names the port its platform sends traffic to, and a server listening
on any other gets none; only ``--port`` overrides them. See
:mod:`packager_server.platforms`, which also describes the ``serve`` argument (SageMaker).

``--serving-mode``: ``fork`` loads the model once and forks the workers from it (they
share its memory); ``spawn`` starts each worker as a fresh interpreter that loads the
model itself (N copies in memory, no state crosses a fork). ``auto`` forks unless the
evidence says a fork is unsafe for this model: a flavor whose runtime keeps thread pools
(TensorFlow, Keras), or threads that loading and the warm-up prediction left running
(OpenMP, CUDA, framework pools): a forked worker would wait forever on a lock one of them
held at the fork. The log and ``/metrics`` (``packager_serving_mode``) say which was used
and why.

``--debug`` puts exception details into error answers; never enable it in production
(answers may then contain request data).

``--header-timeout`` bounds the wait for a request's head (request line and headers) on a
connection: from its opening, or from the first byte of a next request on a kept-alive
one. A client too slow for it gets 408 (if it sent anything) and the connection is
closed, so slow or idle sockets (slowloris) cannot hold a worker's or the loading
responder's connections.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager_server.cpu import available_cpus

DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 5.0
SERVING_MODES = ("auto", "fork", "spawn")
# The platforms' variables, in the order they are consulted (see platforms.py).
PORT_VARIABLES = ("SAGEMAKER_BIND_TO_PORT", "AIP_HTTP_PORT", "PORT", "PACKAGER_PORT")
WORKERS_VARIABLES = ("SAGEMAKER_MODEL_SERVER_WORKERS",)
TIMEOUT_VARIABLES = ("SAGEMAKER_MODEL_SERVER_TIMEOUT",)
_MAX_ROUTE = 1024  # Vertex AI's routes embed endpoint and model ids: well under this


class ConfigError(ValueError):
    """A setting has an invalid value."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    model_dir: Path
    host: str = "0.0.0.0"  # noqa: S104 - a container's server listens on every interface
    port: int = 8080
    workers: int = 1
    timeout: float = DEFAULT_TIMEOUT
    max_payload: int = DEFAULT_MAX_PAYLOAD
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    fast_path: bool = True
    debug: bool = False
    model_name: str | None = None
    model_version: str | None = None
    serving_mode: Literal["auto", "fork", "spawn"] = "auto"
    # Vertex AI's routes (AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE), when set: see platforms.py.
    health_route: str | None = None
    predict_route: str | None = None


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return value
    return None


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


def _number(value: str | None, name: str, kind: type[int] | type[float]) -> float | None:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError as err:
        raise ConfigError(f"{name}: {value!r} is not a number") from err
    if number <= 0:
        raise ConfigError(f"{name}: must be positive, got {value}")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packager_server",
        description="Serve an MLflow pyfunc model with MLflow's scoring protocol.",
        epilog="Every flag also has an environment variable; see the module docstring of "
        "packager_server.config or the README. To score a file instead of serving: "
        "python -m packager_server predict --help.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["serve"],
        help="SageMaker starts containers with 'serve'; the server needs no command",
    )
    p.add_argument("--model-dir", type=Path, help="the model directory (holds MLmodel)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--timeout", type=float, help="seconds per request (504 after)")
    p.add_argument("--max-payload", type=int, help="bytes per request body (413 above)")
    p.add_argument("--graceful-timeout", type=float, help="seconds to finish on SIGTERM")
    p.add_argument(
        "--header-timeout",
        type=float,
        help="seconds for a request's line and headers to arrive (408 and close after); "
        f"default {DEFAULT_HEADER_TIMEOUT:g}",
    )
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument(
        "--no-fast-path",
        action="store_true",
        help="always use MLflow's own parsing and schema enforcement",
    )
    p.add_argument("--debug", action="store_true")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    p.add_argument(
        "--serving-mode",
        choices=SERVING_MODES,
        help="how workers get the model: fork from one load, spawn a load each, or auto "
        "(fork unless the model's runtime is not fork-safe); default auto",
    )
    return p


def load_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build the configuration; raises :class:`ConfigError` on invalid values."""
    env = os.environ if env is None else env
    args = parser().parse_args(argv)
    model_dir = args.model_dir or (Path(v) if (v := _env(env, "PACKAGER_MODEL_DIR")) else None)
    if model_dir is None:
        raise ConfigError("no model: pass --model-dir or set PACKAGER_MODEL_DIR")
    port = args.port or _number(_env(env, *PORT_VARIABLES), "port", int) or 8080
    if not 0 < port < 65536:
        raise ConfigError(f"port: {port} is not a TCP port")
    workers = (
        args.workers
        or _number(
            _env(env, "PACKAGER_WORKERS", "MLFLOW_MODELS_WORKERS", *WORKERS_VARIABLES),
            "workers",
            int,
        )
        or available_cpus()
    )
    log_format = args.log_format or _env(env, "PACKAGER_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"PACKAGER_LOG_FORMAT={log_format!r}: expected text or json")
    return ServerConfig(
        model_dir=model_dir,
        host=args.host or _env(env, "PACKAGER_HOST") or "0.0.0.0",  # noqa: S104
        port=int(port),
        workers=int(workers),
        timeout=float(
            args.timeout
            or _number(
                _env(
                    env,
                    "PACKAGER_TIMEOUT",
                    "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT",
                    *TIMEOUT_VARIABLES,
                ),
                "timeout",
                float,
            )
            or DEFAULT_TIMEOUT
        ),
        max_payload=int(
            args.max_payload
            or _number(_env(env, "PACKAGER_MAX_PAYLOAD"), "max payload", int)
            or DEFAULT_MAX_PAYLOAD
        ),
        graceful_timeout=float(
            args.graceful_timeout
            or _number(_env(env, "PACKAGER_GRACEFUL_TIMEOUT"), "graceful timeout", float)
            or DEFAULT_GRACEFUL_TIMEOUT
        ),
        header_timeout=_header_timeout(args.header_timeout, env),
        log_format=log_format,  # type: ignore[arg-type]
        access_log=not args.no_access_log and _flag(env, "PACKAGER_ACCESS_LOG", True),
        fast_path=not args.no_fast_path and _flag(env, "PACKAGER_FAST_PATH", True),
        debug=args.debug or _flag(env, "PACKAGER_DEBUG", False),
        model_name=args.model_name or _env(env, "PACKAGER_MODEL_NAME"),
        model_version=args.model_version or _env(env, "PACKAGER_MODEL_VERSION"),
        serving_mode=_serving_mode(args.serving_mode, env),
        health_route=_route(env, "AIP_HEALTH_ROUTE"),
        predict_route=_route(env, "AIP_PREDICT_ROUTE"),
    )


def _serving_mode(flag: str | None, env: Mapping[str, str]) -> Literal["auto", "fork", "spawn"]:
    value = flag or _env(env, "PACKAGER_SERVING_MODE") or "auto"
    if value not in SERVING_MODES:
        raise ConfigError(f"PACKAGER_SERVING_MODE={value!r}: expected auto, fork or spawn")
    return value  # type: ignore[return-value]


def _route(env: Mapping[str, str], name: str) -> str | None:
    """A Vertex AI route from ``name``; refused unless it is a plain absolute path."""
    value = _env(env, name)
    if value is None:
        return None
    if (
        not value.startswith("/")
        or len(value) > _MAX_ROUTE
        or not value.isascii()
        or not value.isprintable()
        or any(c in value for c in " ?#")
    ):
        raise ConfigError(
            f"{name}: expected an absolute path (/...) of at most {_MAX_ROUTE} printable "
            "ASCII characters, without spaces, query or fragment"
        )
    return value


def _header_timeout(flag: float | None, env: Mapping[str, str]) -> float:
    if flag is None:
        value = _number(_env(env, "PACKAGER_HEADER_TIMEOUT"), "header timeout", float)
        return float(value or DEFAULT_HEADER_TIMEOUT)
    if not flag > 0:  # also refuses NaN
        raise ConfigError(f"--header-timeout: must be positive, got {flag:g}")
    return flag
