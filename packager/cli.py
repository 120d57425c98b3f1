"""``packager`` command line: parse arguments, call :mod:`packager.api`, print the result.

Output contract: results go to stdout (one JSON document with ``--json``); logs, progress and
errors go to stderr. With ``--json`` an error is also printed to stdout as
``{"error": {...}}`` so a pipeline can read it. Exit codes: see :mod:`packager.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from packager import __version__, api, publish
from packager.cache import ModelCache
from packager.deploy import inputs as deploy_inputs
from packager.deploy import manifests
from packager.env.inputs import IndexOptions
from packager.errors import ALL_ERRORS, PackagerError, UsageError
from packager.image.base import DEFAULT_MIRROR, build_base
from packager.jsonable import to_jsonable
from packager.progress import LogProgress, Progress, RichBuildSteps, RichProgress
from packager.redact import SecretFilter, scrub
from packager.reference import FORMS_HELP
from packager.render import render
from packager.source import RegistryOptions

log = logging.getLogger("packager")

_EXIT_CODES = "\n".join(
    f"  {cls.exit_code:<4} {cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}"
    for cls in ALL_ERRORS
)

_DESCRIPTION = f"""\
Package an MLflow model version as a serving image.

model references: {FORMS_HELP}.
The tracking server comes from --tracking-uri or MLFLOW_TRACKING_URI, with MLflow's usual
auth variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, Databricks).
"""

_EPILOG = f"""\
examples:
  packager inspect models:/wine@champion
  packager inspect models:/wine/3 --json | jq .spec.requirements
  packager inspect ./downloaded-model
  packager lock models:/wine@champion -o wine.lock
  packager serve models:/wine@champion --port 5001
  packager base build --python 3.11 -t packager-base:3.11
  packager build models:/wine@champion -t wine:3 --base-image packager-base:3.11
  packager build models:/wine@champion -t registry.example.com/wine:3 --push
  packager test wine:3
  packager push registry.example.com/team/wine:3

exit codes:
  0    success
  1    unexpected error (a bug: please report it with --debug output)
{_EXIT_CODES}
  130  interrupted
"""


_MODEL_HELP = f"the model: {FORMS_HELP}"
_IMAGE_HELP = (
    "an image in the local engine: NAME:TAG, its id, or REGISTRY/REPO@sha256:DIGEST "
    "(as `build` and `push` print)"
)


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (logs stay on stderr)",
    )
    common.add_argument(
        "--debug", action="store_true", help="verbose logs and tracebacks on errors"
    )
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)",
    )
    registry.add_argument(
        "--registry-uri",
        metavar="URI",
        help="model registry, if not the tracking server (default: $MLFLOW_REGISTRY_URI)",
    )
    registry.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        help="download cache (default: $PACKAGER_CACHE_DIR or the user cache)",
    )
    registry.add_argument(
        "--skip-outside-links",
        action="store_true",
        help="leave out (with a warning) symbolic links in a local model directory that "
        "point outside it; by default they are an error, since they would ship host files",
    )

    parser = argparse.ArgumentParser(
        prog="packager",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"packager {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        parents=[common, registry],
        help="describe what a model needs to be served",
        description="Resolve a model reference, download the model (cached), and describe "
        "its flavors, Python, requirements, code, artifacts, wheels and signature.",
        epilog="examples:\n  packager inspect models:/wine/Production\n"
        "  packager inspect runs:/0a1b2c.../model --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    inspect.set_defaults(handler=_inspect)

    locking = _lock_parser()
    lock = commands.add_parser(
        "lock",
        parents=[common, registry, locking],
        help="lock the model's requirements for the image, with hashes",
        description="Resolve the model's requirements, its wheels and the scoring server's "
        "needs into one lock: every package pinned with == and its sha256 hashes, for the "
        "image's Python and platform (not this machine's). Cached by its inputs.",
        epilog="examples:\n  packager lock models:/wine/3 -o wine.lock\n"
        "  packager lock models:/wine/3 --python 3.12 --platform linux/arm64\n"
        "  packager lock models:/wine/3 --lock wine.lock   # verify a lock you keep\n"
        "  packager lock models:/dbx-model/1 --wheel-dir ./wheels --download\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lock.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    lock.add_argument("-o", "--output", type=Path, help="write the lock here (default: stdout)")
    lock.add_argument(
        "--download",
        action="store_true",
        help="also download every wheel into the cache (the wheelhouse)",
    )
    lock.add_argument(
        "--conda-lock",
        type=Path,
        metavar="FILE",
        help="also write the lock's conda part here as a conda-lock file (conda-lock install "
        "reads it)",
    )
    lock.set_defaults(handler=_lock)

    _add_image_commands(commands, common, registry, locking)

    serve = commands.add_parser(
        "serve",
        parents=[common, registry],
        help="serve a model locally with packager's scoring server",
        description="Fetch the model (cached) and run packager_server on it in this Python "
        "environment, which must have the model's requirements installed. It speaks "
        "MLflow's scoring protocol: POST /invocations, GET /ping, /health, /version, "
        "/metrics, /live, /ready.",
        epilog="examples:\n  packager serve models:/wine@champion --port 5001\n"
        "  curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\\n"
        '    -d \'{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}\'\n',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--workers", type=int, help="processes (default: the CPU limit)")
    serve.add_argument("--timeout", type=float, help="seconds per request (default 120)")
    serve.add_argument("--max-payload", type=int, help="bytes per request (default 16 MiB)")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="server logs and the access log: text lines, or one JSON object per line "
        "(default: text)",
    )
    serve.set_defaults(handler=_serve)
    _add_predict_command(commands, common, registry)
    _add_manifests_command(commands, common, registry)
    _add_webhook_commands(commands, [common, registry, locking, _image_parser()])
    return parser


def _lock_parser() -> argparse.ArgumentParser:
    """The lock's options, shared by lock, generate and build: a pipeline can build
    exactly the lock it reviewed (--lock), for the Python and indexes it chose."""
    locking = argparse.ArgumentParser(add_help=False)
    locking.add_argument(
        "--resolver",
        choices=["uv", "pip-tools"],
        default="uv",
        help="uv (default: locks for any Python and platform from any host) or pip-tools "
        "(pip-compile: only for this machine's Python and platform)",
    )
    locking.add_argument(
        "--python",
        metavar="X.Y",
        help="the image's Python (default: the model's, from MLmodel or python_env.yaml)",
    )
    locking.add_argument(
        "--platform",
        default="linux/amd64",
        choices=["linux/amd64", "linux/arm64"],
        help="the image's platform: the lock's wheels are for it, and a base image must be "
        "built for it (default: linux/amd64)",
    )
    locking.add_argument(
        "--lock",
        type=Path,
        dest="lock_file",
        metavar="FILE",
        help="use this lock (e.g. kept in git) as is, after checking it satisfies the model",
    )
    locking.add_argument(
        "--wheel-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="directory of wheels the model names by path (e.g. /dbfs/.../lib.whl) or the "
        "indexes lack; repeatable",
    )
    locking.add_argument(
        "--index-url",
        metavar="URL",
        help="package index (credentials allowed; default: $PIP_INDEX_URL, or the model's)",
    )
    locking.add_argument(
        "--extra-index-url",
        action="append",
        default=[],
        metavar="URL",
        help="additional index; repeatable (default: $PIP_EXTRA_INDEX_URL)",
    )
    locking.add_argument(
        "--ignore-conda",
        action="store_true",
        help="lock only the pip requirements of a model whose conda.yaml has conda packages",
    )
    locking.add_argument(
        "--conda-channel",
        action="append",
        default=[],
        metavar="URL",
        help="conda channel to solve conda.yaml's packages against, instead of the channels it "
        "names (credentials allowed, never written); repeatable, in priority order",
    )
    locking.add_argument(
        "--mlflow-skinny",
        action="store_true",
        help="swap mlflow for mlflow-skinny of the same version (plus numpy, pandas, pyarrow) "
        "for a smaller image; PythonModel and sklearn models only",
    )
    return locking


def _image_parser() -> argparse.ArgumentParser:
    """The image's options, shared by generate, build, release and webhook serve."""
    image_parent = argparse.ArgumentParser(add_help=False)
    image_parent.add_argument(
        "--base-image",
        default=None,
        metavar="REF",
        help="base image: in the local engine, else pulled from its registry by the default "
        "backend (PACKAGER_BASE_REGISTRY: a mirror for Docker Hub names); also oci:DIR, "
        "docker-archive:FILE, docker://REGISTRY/NAME:TAG (default: python:X.Y-slim for the "
        "image's Python)",
    )
    image_parent.add_argument(
        "--system-package",
        action="append",
        default=[],
        metavar="PKG",
        help="Debian package to install in the image (e.g. libgomp1)",
    )
    image_parent.add_argument(
        "--no-bytecode",
        dest="bytecode",
        action="store_false",
        help="ship no .pyc files: a smaller image that starts slower (by default the "
        "base's Python compiles the dependencies, tests excepted)",
    )
    image_parent.add_argument(
        "--keep-tests",
        action="store_true",
        help="keep the tests directories that packages ship (removed by default: a "
        "served model never imports them)",
    )
    return image_parent


def _add_image_commands(
    commands: Any,
    common: argparse.ArgumentParser,
    registry: argparse.ArgumentParser,
    locking: argparse.ArgumentParser,
) -> None:
    """generate, build, test and base build."""
    image_parent = _image_parser()

    generate = commands.add_parser(
        "generate",
        parents=[common, registry, locking, image_parent],
        help="write a self-contained Docker build context for a model",
        description="Lock the model, download its wheelhouse and write a build context "
        "(Dockerfile, lock, wheels, server, model) that builds with no network.",
        epilog="example:\n  packager generate models:/wine/3 -o build/wine && "
        "docker build build/wine\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    generate.add_argument("-o", "--output", type=Path, required=True, help="context directory")
    generate.set_defaults(handler=_generate)

    build = commands.add_parser(
        "build",
        parents=[common, registry, locking, image_parent],
        help="build a serving image (daemonless and reproducible, or with the Docker engine)",
        description="Lock, generate and build the model's image. The default backend (oci) "
        "writes the image itself, byte for byte the same for the same inputs, with no "
        "engine: into the engine (-t alone when one answers, or --load), as an OCI layout "
        "(-o), a docker-archive (--archive) or straight to a registry (--push). --backend "
        "docker (the default with --system-package) builds the rendered Dockerfile with the "
        "Docker engine; the tag is set only after a successful build.",
        epilog="examples:\n  packager base build --python 3.11 -t packager-base:3.11\n"
        "  packager build models:/wine@champion -t wine:3 --base-image packager-base:3.11\n"
        "  packager build models:/wine/3 -t registry.example.com/wine:3 --push "
        "--base-image packager-base:3.11\n"
        "  packager build models:/wine/3 -o build/wine-oci --base-image packager-base:3.11\n"
        "  packager build models:/wine/3 --check-reproducible --base-image packager-base:3.11\n"
        "  packager build models:/wine/3 --backend docker -t wine:3 --system-package libgomp1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    build.add_argument(
        "-t",
        "--tag",
        metavar="IMAGE:TAG",
        help="the image's name: loaded into the local engine, or with --push, pushed to the "
        "registry it names (REGISTRY/REPO:TAG); required by --backend docker",
    )
    build.add_argument("--push", action="store_true", help="push the image after building")
    build.add_argument(
        "--backend",
        choices=("docker", "oci"),
        help="oci (the default): packager writes the image, reproducibly, with no engine; "
        "docker (the default with --system-package): the engine builds the Dockerfile",
    )
    build.add_argument("-o", "--output", type=Path, help="oci: write an OCI image layout here")
    build.add_argument(
        "--archive", type=Path, metavar="FILE", help="oci: write a docker-archive tar here"
    )
    build.add_argument(
        "--load",
        action="store_true",
        help="oci: load into the local engine (what -t alone does when an engine answers)",
    )
    build.add_argument(
        "--check-reproducible",
        action="store_true",
        help="oci: build twice from empty caches and compare the digests",
    )
    build.set_defaults(handler=_build)

    check = commands.add_parser(
        "test",
        parents=[common, registry],
        help="run an image and check it answers as the model does",
        description="Check an image packager built: it must be in the engine and carry "
        "packager's labels. A second container of the image computes MLflow's own answers "
        "for the model's serving example (and --payload files), with no network; then the "
        "image runs on a random local port and must: become ready (/ready), answer 200 on "
        "/ping, /health, /version, /metrics and /live, name in /metrics the model and "
        "version its labels promise, and answer every request as MLflow does. It reports "
        "the start-up time, the p50 latency and the memory used. Needs only packager and a "
        "Docker engine: the model's requirements are in the image. The containers are "
        "always removed; exit 20 on any mismatch.",
        epilog="examples:\n  packager test wine:3\n"
        "  packager test wine:3 --model models:/wine@champion   # also: built from it?\n"
        "  packager test registry.example.com/wine@sha256:... --payload request.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    check.add_argument(
        "--model",
        help="also check the image was built from this model (its content digest); by "
        "default the image's labels say which model it serves",
    )
    check.add_argument(
        "--payload",
        type=Path,
        action="append",
        default=[],
        help="a JSON request body to replay; repeatable",
    )
    check.set_defaults(handler=_test)

    push_parser = commands.add_parser(
        "push",
        parents=[common],
        help="push an image to a registry and print its digest",
        description="Push IMAGE with the Docker engine. Credentials: docker login / "
        "credential helpers, or PACKAGER_REGISTRY_USERNAME and PACKAGER_REGISTRY_PASSWORD. "
        "Succeeds only when the registry confirms a digest.",
        epilog="example:\n  packager push registry.example.com/team/wine:3\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push_parser.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    push_parser.set_defaults(handler=_push)
    _add_release_command(commands, [common, registry, locking, image_parent])

    base = commands.add_parser(
        "base",
        help="base images built from Debian's packages",
        description="Base images for packager's images, built here from Debian's packages "
        "with mmdebstrap (no registry needed): Debian + Python, a non-root user (uid 10001), "
        "nothing from the build host, reproducible from the same packages. For machines "
        "whose engine cannot pull python:X.Y-slim.",
        epilog="example:\n  packager base build --python 3.11 -t packager-base:3.11\n"
        "  packager build models:/wine/3 -t wine:3 --base-image packager-base:3.11\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    base_commands = base.add_subparsers(dest="base_command", metavar="COMMAND", required=True)
    base_build = base_commands.add_parser(
        "build",
        parents=[common],
        help="build a minimal Debian + Python base image with mmdebstrap",
        description="Build a base image from Debian's packages (mmdebstrap), for engines "
        "that cannot pull. Debian ships Python 3.11 (bookworm) and 3.13 (trixie).",
        epilog="example:\n  packager base build --python 3.11 -t packager-base:3.11\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    base_build.add_argument(
        "--python",
        required=True,
        metavar="X.Y",
        help="the base's Python: 3.11 (Debian bookworm) or 3.13 (trixie)",
    )
    base_build.add_argument(
        "-t", "--tag", required=True, metavar="IMAGE:TAG", help="the base image's name"
    )
    base_build.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror")
    base_build.add_argument("--rebuild", action="store_true", help="even if the tag exists")
    base_build.set_defaults(handler=_base_build)


def _inspect(args: argparse.Namespace) -> int:
    result = api.inspect_model(
        args.model,
        **_source(args),
    )
    if args.json:
        _print_json(to_jsonable(result))
    else:
        sys.stdout.write(render("inspect.txt.j2", inspection=result))
    return 0


def _lock(args: argparse.Namespace) -> int:
    report = api.lock_model(
        args.model,
        replace(_lock_options(args), download=args.download),
        **_source(args),
        cache_root=args.cache_dir,
    )
    result = report.result
    text = result.lock.render()
    if args.output:
        _write_atomically(args.output, text)
    if args.conda_lock:
        if result.lock.conda is None:
            raise UsageError("--conda-lock: this lock has no conda part (the model needs none)")
        _write_atomically(args.conda_lock, result.lock.conda.text)
    how = (
        "verified"
        if result.from_file
        else "from cache"
        if result.cached
        else f"resolved in {result.seconds:.1f}s"
    )
    log.info(
        "%d packages for %s (%s, %s)",
        len(result.lock.packages),
        result.lock.target.describe(),
        result.lock.resolver,
        how,
    )
    if args.json:
        wheelhouse = report.wheelhouse
        _print_json(
            {
                "lock": str(args.output) if args.output else None,
                "digest": result.lock.digest,
                "target": to_jsonable(result.lock.target),
                "resolver": result.lock.resolver,
                "cached": result.cached,
                "seconds": round(result.seconds, 3),
                "packages": to_jsonable(result.lock.packages),
                "conda": to_jsonable(result.lock.conda),
                "wheelhouse": None
                if wheelhouse is None
                else {
                    "downloaded": wheelhouse.downloaded,
                    "files": [to_jsonable(f) for f in wheelhouse.files],
                },
            }
        )
    elif not args.output:
        sys.stdout.write(text)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # /dev/stdout, a FIFO: written in place (a rename would replace the device or link
        # with a regular file)
        try:
            path.write_text(text)
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror}") from err
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {err.strerror}") from err


def _lock_options(args: argparse.Namespace) -> api.LockOptions:
    for directory in args.wheel_dir:
        if not directory.is_dir():
            raise UsageError(f"--wheel-dir {directory}: no such directory")
    return api.LockOptions(
        resolver=args.resolver,
        python=args.python,
        platform=args.platform,
        lock_file=args.lock_file,
        mlflow_skinny=args.mlflow_skinny,
        ignore_conda=args.ignore_conda,
        conda_channels=tuple(args.conda_channel),
        index=IndexOptions.from_environment(
            index_url=args.index_url,
            extra_index_urls=tuple(args.extra_index_url),
            wheel_dirs=tuple(d.resolve() for d in args.wheel_dir),
        ),
    )


def _image_options(args: argparse.Namespace) -> api.ImageOptions:
    return api.ImageOptions(
        base_image=args.base_image,
        system_packages=tuple(args.system_package),
        bytecode=args.bytecode,
        keep_tests=args.keep_tests,
        lock=_lock_options(args),
    )


def _generate(args: argparse.Namespace) -> int:
    result = api.generate_context(
        args.model, args.output, _image_options(args), **_source(args), cache_root=args.cache_dir
    )
    log.info("wrote the build context to %s (%d files)", args.output, len(result.plan.files))
    if api.base_missing(result.plan.base_image):
        log.warning(
            "the base image %s is not in the local engine, so `docker build` will try to pull "
            "it; build one (packager base build --python %s -t TAG) and pass --base-image TAG",
            result.plan.base_image,
            result.plan.python,
        )
    if args.json:
        _print_json(
            {
                "context": str(args.output),
                "files": len(result.plan.files),
                "lock_digest": result.lock.result.lock.digest,
            }
        )
    return 0


def _build(args: argparse.Namespace) -> int:
    if args.backend is None:
        # apt runs only inside the Docker engine's build.
        args.backend = "docker" if args.system_package else "oci"
        if args.system_package:
            log.info("--system-package needs the Docker backend: building with the engine")
    if args.backend == "oci":
        return _build_oci(args)
    oci_only = [
        flag
        for flag, value in (
            ("-o", args.output),
            ("--archive", args.archive),
            ("--load", args.load),
            ("--check-reproducible", args.check_reproducible),
        )
        if value
    ]
    if oci_only:
        raise UsageError(
            f"{', '.join(oci_only)} only apply to --backend oci",
            hint="add --backend oci (the Docker backend always builds into the engine)",
        )
    if not args.tag:
        raise UsageError("the Docker backend needs a tag", hint="pass -t IMAGE:TAG")
    steps = RichBuildSteps() if sys.stderr.isatty() and not args.json else None
    try:
        built = api.build_image(
            args.model,
            args.tag,
            _image_options(args),
            **_source(args),
            cache_root=args.cache_dir,
            on_log=steps or (None if args.json else lambda line: log.info("%s", line)),
        )
    finally:
        if steps is not None:
            steps.close()
    pushed = publish.push(built.tags[0]) if args.push else None
    if args.json:
        _print_json(
            {
                "image_id": built.image_id,
                "tags": list(built.tags),
                "pushed": to_jsonable(pushed) if pushed else None,
                "size_bytes": built.size_bytes,
                "base_image": built.base_image,
                "base_image_id": built.base_image_id,
                "base_image_digest": built.base_image_digest,
                "lock_digest": built.context.lock.result.lock.digest,
            }
        )
    else:
        sys.stdout.write(f"{built.tags[0]} {built.image_id} {built.size_bytes / 2**20:.0f} MiB\n")
        if pushed is not None:
            sys.stdout.write(f"pushed {pushed.pinned}\n")
    return 0


def _build_oci(args: argparse.Namespace) -> int:
    source = _source(args)
    if args.check_reproducible:
        report = api.check_reproducible(
            args.model,
            _image_options(args),
            options=source["options"],
            progress=source["progress"],
        )
        if args.json:
            _print_json(to_jsonable(report))
        elif report.reproducible:
            sys.stdout.write(f"reproducible: both builds gave {report.digests[0]}\n")
        else:
            sys.stdout.write(
                f"NOT reproducible: {report.digests[0]} != {report.digests[1]}\n"
                f"first difference: {report.first_difference}\n"
            )
        return 0 if report.reproducible else 19
    load = args.load
    if not (args.output or args.archive or args.load or args.push):
        # -t alone: into the engine, as `docker build -t` would, when there is one.
        if not args.tag:
            raise UsageError(
                "the build needs somewhere to put the image",
                hint="pass -t IMAGE:TAG (loaded into the local engine), -o DIR (an OCI "
                "layout), --archive FILE, or -t REGISTRY/REPO:TAG --push",
            )
        if not api.engine_reachable():
            raise UsageError(
                f"-t {args.tag} loads the image into the Docker engine, and none answers "
                f"(DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')})",
                hint="pass -o DIR (an OCI layout) or --archive FILE, or --push to push "
                "to the registry in -t directly; no engine is needed for those",
            )
        load = True
    outputs = api.OciOutputs(layout=args.output, archive=args.archive, load=load, push=args.push)
    built = api.build_oci_image(
        args.model, _image_options(args), outputs, tag=args.tag, **source, cache_root=args.cache_dir
    )
    if args.json:
        _print_json(to_jsonable(built))
    else:
        sys.stdout.write(
            f"{built.tag or '-'} {built.manifest_digest} {built.size_bytes / 2**20:.0f} MiB "
            f"({built.layers_written} of {built.layers} layers written)\n"
        )
        if built.layers_loaded is not None:
            sys.stdout.write(
                f"loaded {built.tag}: {built.layers_loaded} layers sent to the engine\n"
            )
        if built.pushed is not None:
            sys.stdout.write(f"pushed {built.pushed.pinned}\n")
    return 0


def _test(args: argparse.Namespace) -> int:
    report = api.verify_built_image(
        args.image,
        args.model,
        payloads=tuple(args.payload),
        **{k: v for k, v in _source(args).items() if k != "progress"},
    )
    if args.json:
        _print_json(to_jsonable(report) | {"passed": report.passed})
    else:
        for path, status in report.endpoints:
            sys.stdout.write(f"GET {path}: {status}\n")
        if report.labelled_as is not None:
            verdict = "ok" if report.serves_as_labelled else "MISMATCH"
            sys.stdout.write(f"serves {report.labelled_as} (as labelled): {verdict}\n")
        for payload in report.payloads:
            verdict = "ok" if payload.matches else "MISMATCH"
            sys.stdout.write(
                f"POST {payload.name}: {payload.status} "
                f"(expected {payload.expected_status}) {verdict}\n"
            )
        if report.built_from_model is not None:
            verdict = "ok" if report.built_from_model else "MISMATCH"
            sys.stdout.write(f"built from {args.model} ({report.model_digest}): {verdict}\n")
        memory = (
            f", {report.memory_bytes / 2**20:.0f} MiB" if report.memory_bytes is not None else ""
        )
        sys.stdout.write(
            f"ready after {report.startup_seconds:.1f}s, p50 "
            f"{report.latency_p50_ms:.1f} ms{memory}: "
            f"{'passed' if report.passed else 'FAILED'}\n"
        )
    return 0 if report.passed else 20


def _push(args: argparse.Namespace) -> int:
    pushed = publish.push(args.image)
    if args.json:
        _print_json(to_jsonable(pushed))
    else:
        sys.stdout.write(f"{pushed.pinned}\n")
    return 0


def _add_release_command(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    release = commands.add_parser(
        "release",
        parents=parents,
        help="lock, build, test, push and record a model version in one step",
        description="Release registered model versions: lock, build (oci by default, no "
        "engine needed), test (when a Docker engine answers), push to every -t, then record "
        "in the MLflow registry the version tags packager.image (REPO@sha256:...), "
        "packager.lock_digest, packager.base_digest and packager.version, and move --alias "
        "last. A failed test pushes nothing. A version whose recorded image is in the "
        "registry with the same lock, base and packager is 'already released' (exit 0). "
        "Several models run one after another; one failure does not stop the others, and "
        "the exit code is the first failure's.",
        epilog="examples:\n  packager release models:/wine/3 -t registry.example.com/wine:3 "
        "--alias champion\n"
        "  packager release models:/a/3 models:/b@candidate -t 127.0.0.1:5000/models --json\n"
        "  packager release --from models.txt -t registry.example.com/models --no-test\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    release.add_argument("models", metavar="MODEL", nargs="*", help=_MODEL_HELP)
    release.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE",
        help="read model references from FILE, one a line (# starts a comment)",
    )
    release.add_argument(
        "-t",
        "--tag",
        dest="tags",
        action="append",
        default=[],
        required=True,
        metavar="REGISTRY/REPO[:TAG]",
        help="where to push; repeatable (the first is recorded). Without :TAG, several "
        "models are told apart by a tag NAME-VERSION",
    )
    release.add_argument("--backend", choices=("oci", "docker"), default="oci")
    release.add_argument("--no-test", dest="test", action="store_false", help="skip the test")
    release.add_argument("--alias", metavar="NAME", help="move this alias to the version")
    release.add_argument("--force", action="store_true", help="release even if already released")
    release.add_argument(
        "--attestations-dir",
        type=Path,
        metavar="DIR",
        help="also write the SBOM and provenance here (sha256-<hex>.sbom.json, .att.json)",
    )
    release.add_argument(
        "--no-attestations",
        dest="attestations",
        action="store_false",
        help="push no SBOM and provenance (by default both are pushed, tagged "
        "sha256-<hex>.sbom and sha256-<hex>.att, with the image as their subject)",
    )
    release.add_argument(
        "--manifests",
        dest="manifests_dir",
        type=Path,
        metavar="DIR",
        help="write Kubernetes manifests for the pushed digest into DIR/NAME (NAME: the "
        "model's name), sized from the test, as `packager manifests` writes them; a "
        "previous release's files there are replaced",
    )
    release.set_defaults(handler=_release)
    attestations = commands.add_parser(
        "attestations",
        parents=[parents[0]],
        help="fetch and check the SBOM and provenance pushed next to an image",
        description="Fetch the artifacts tagged sha256-<hex>.sbom and sha256-<hex>.att next "
        "to IMAGE (as `packager release` pushes them) and check them: each names the image "
        "as its subject, and the model and lock they describe are those the image's labels "
        "name. Exit 20 when they disagree.",
        epilog="example:\n  packager attestations registry.example.com/wine@sha256:... -o att/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attestations.add_argument("image", metavar="REGISTRY/REPO@sha256:DIGEST")
    attestations.add_argument("-o", "--output", type=Path, metavar="DIR", help="write them here")
    attestations.set_defaults(handler=_attestations)
    rebuild = commands.add_parser(
        "rebuild",
        parents=parents[:2],
        help="rebuild a released image from its provenance and compare digests",
        description="Read the provenance pushed next to IMAGE (by `packager release`), fetch "
        "the same model version, lock and base digest, build again from empty caches with "
        "the OCI backend, and report whether the manifest digest is the same (and, if not, "
        "the first differing layer and file). Exit 19 when the digests differ, 26 when the "
        "provenance cannot be followed (the model version's files or the base changed).",
        epilog="example:\n  packager rebuild registry.example.com/wine@sha256:... "
        "--base-image packager-base:3.11\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rebuild.add_argument("image", metavar="REGISTRY/REPO@sha256:DIGEST")
    rebuild.add_argument(
        "--base-image",
        metavar="REF",
        help="where to get the recorded base from, if not from the reference it was built "
        "from (it must have the recorded digest)",
    )
    rebuild.add_argument("--index-url", metavar="URL", help="package index (as for build)")
    rebuild.add_argument(
        "--extra-index-url", action="append", default=[], metavar="URL", help="repeatable"
    )
    rebuild.add_argument(
        "--wheel-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="wheels the indexes lack, as given to the release; repeatable",
    )
    rebuild.set_defaults(handler=_rebuild)


def _release(args: argparse.Namespace) -> int:
    from packager import release  # noqa: PLC0415 - only this command needs it

    references = list(args.models)
    if args.from_file is not None:
        try:
            lines = args.from_file.read_text().splitlines()
        except OSError as err:
            raise UsageError(f"cannot read --from {args.from_file}: {err.strerror}") from err
        references += [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
    if not references:
        raise UsageError("no model to release", hint="name models, or pass --from FILE")
    tagged = [t for t in args.tags if release.has_tag(t)]
    if len(references) > 1 and tagged:
        raise UsageError(
            f"{len(references)} models would all be pushed to {tagged[0]}",
            hint="give -t REGISTRY/REPO without :TAG: each model gets the tag NAME-VERSION",
        )
    source = _source(args)
    results = release.release_models(
        tuple(references),
        release.ReleaseOptions(
            tags=tuple(args.tags),
            image=_image_options(args),
            backend=args.backend,
            test=args.test,
            alias=args.alias,
            force=args.force,
            attestations=args.attestations,
            attestations_dir=args.attestations_dir,
            manifests_dir=args.manifests_dir,
        ),
        registry=source["options"],
        cache=source["cache"],
        cache_root=args.cache_dir,
        progress=source["progress"],
        announce=lambda line: log.info("%s", line),
    )
    failed = [r for r in results if isinstance(r, release.Failure)]
    if args.json:
        _print_json(
            {
                "releases": [to_jsonable(r) for r in results if not isinstance(r, release.Failure)],
                "failed": [to_jsonable(r) for r in failed],
            }
        )
    else:
        for result in results:
            if isinstance(result, release.Failure):
                sys.stdout.write(f"{result.model}: FAILED ({result.exit_code}) {result.error}\n")
            else:
                tested = "tested" if result.tested else f"not tested: {result.test_skipped}"
                if result.status == "already released":
                    tested = "nothing to do"
                sys.stdout.write(f"{result.model}: {result.status} {result.image} ({tested})\n")
                if result.manifests is not None:
                    sys.stdout.write(f"  manifests in {result.manifests.directory}\n")
                elif result.manifests_skipped is not None:
                    sys.stdout.write(f"  no manifests: {result.manifests_skipped}\n")
    return failed[0].exit_code if failed else 0


def _attestations(args: argparse.Namespace) -> int:
    from packager import release  # noqa: PLC0415 - only this command needs it

    checked = release.check_attestations(args.image, args.output)
    if args.json:
        _print_json(to_jsonable(checked) | {"verified": checked.verified})
    else:
        for kind, reference in checked.attestations.items():
            sys.stdout.write(f"{kind}: {reference}\n")
        for problem in checked.problems:
            sys.stdout.write(f"MISMATCH: {problem}\n")
        sys.stdout.write("verified\n" if checked.verified else "NOT verified\n")
    return 0 if checked.verified else 20


def _rebuild(args: argparse.Namespace) -> int:
    from packager import rebuild  # noqa: PLC0415 - only this command needs it

    source = _source(args)
    report = rebuild.rebuild(
        args.image,
        base_image=args.base_image,
        registry=source["options"],
        index=IndexOptions.from_environment(
            index_url=args.index_url,
            extra_index_urls=tuple(args.extra_index_url),
            wheel_dirs=tuple(d.resolve() for d in args.wheel_dir),
        ),
        progress=source["progress"],
    )
    if args.json:
        _print_json(to_jsonable(report))
    elif report.reproducible:
        sys.stdout.write(f"reproduced: {report.model} rebuilds to {report.rebuilt}\n")
    else:
        sys.stdout.write(
            f"NOT reproduced: {report.model} rebuilds to {report.rebuilt}, not "
            f"{report.image.partition('@')[2]}\nfirst difference: {report.first_difference}\n"
        )
    return 0 if report.reproducible else 19


def _base_build(args: argparse.Namespace) -> int:
    base = build_base(args.python, args.tag, mirror=args.mirror, rebuild=args.rebuild)
    if args.json:
        _print_json(to_jsonable(base))
    else:
        how = "built" if base.built else "already present"
        sys.stdout.write(
            f"{base.reference} {base.image_id} (Debian {base.suite}, Python {base.python}, {how})\n"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    command = api.serve_command(
        args.model,
        api.ServeOptions(
            host=args.host,
            port=args.port,
            workers=args.workers,
            timeout=args.timeout,
            max_payload=args.max_payload,
            log_format=args.log_format,
        ),
        **_source(args),
    )
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    return _exec_server(command, json_out=args.json)


def _exec_server(command: Any, *, json_out: bool) -> int:
    """Print the command (with ``--json``), then replace this process with it: signals
    (SIGTERM, Ctrl-C), messages and the exit code are packager_server's."""
    if json_out:
        _print_json({"argv": list(command.argv), "provenance": to_jsonable(command.provenance)})
        sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command.argv[0], list(command.argv))  # noqa: S606 - argv list, no shell
    return 0  # pragma: no cover - execv does not return


def _add_predict_command(
    commands: Any, common: argparse.ArgumentParser, registry: argparse.ArgumentParser
) -> None:
    predict = commands.add_parser(
        "predict",
        parents=[common, registry],
        help="score a file with a model (the image's `predict`, in this environment)",
        description="Fetch the model (cached) and score a CSV, JSON lines, JSON or Parquet "
        "file with packager_server's batch scoring in this Python environment, which must "
        "have the model's requirements installed: the same code as `docker run IMAGE "
        "predict`, through the same parsing as POST /invocations. Streams in chunks; "
        "writes one prediction per row (CSV for CSV input, JSON lines otherwise), "
        "atomically.",
        epilog="examples:\n  packager predict models:/wine@champion -i wine.csv -o scored.csv\n"
        "  packager predict ./model -i rows.jsonl -o predictions.jsonl --workers 4\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    predict.add_argument("-i", "--input", type=Path, required=True, help="the file to score")
    predict.add_argument("-o", "--output", type=Path, required=True, help="the predictions")
    predict.add_argument(
        "-t",
        "--content-type",
        choices=["csv", "json", "jsonl", "parquet"],
        help="the input's format (default: from its suffix)",
    )
    predict.add_argument("--workers", type=int, help="processes (default: the CPU limit)")
    predict.add_argument("--chunk-rows", type=int, help="rows per prediction call")
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    command = api.predict_command(
        args.model,
        api.PredictOptions(
            input=args.input,
            output=args.output,
            content_type=args.content_type,
            workers=args.workers,
            chunk_rows=args.chunk_rows,
        ),
        **_source(args),
    )
    return _exec_server(command, json_out=args.json)


def _add_manifests_command(
    commands: Any, common: argparse.ArgumentParser, registry: argparse.ArgumentParser
) -> None:
    manifests_parser = commands.add_parser(
        "manifests",
        parents=[common, registry],
        help="write Kubernetes (or KServe) manifests for a pushed image",
        description="Pin IMAGE by the digest its registry serves and write, into DIR, a "
        "Deployment (probes on /livez and /readyz, a startup probe sized from the measured "
        "start-up, memory from the measured use, non-root with the image's uid, read-only "
        "root file system, no capabilities, RuntimeDefault seccomp, a grace period that "
        "covers the server's drain), a Service, a HorizontalPodAutoscaler, a "
        "PodDisruptionBudget and a kustomization.yaml; or with --format kserve a KServe "
        "InferenceService. The measurements come from `packager test IMAGE --json` "
        "(--from-test) or flags. The YAML is sorted, so the same inputs give the same files.",
        epilog="examples:\n  packager test registry.example.com/wine:3 --json > test.json\n"
        "  packager manifests registry.example.com/wine:3 --from-test test.json -o deploy/\n"
        "  packager manifests registry.example.com/wine@sha256:... --startup-seconds 8 "
        "--memory 600Mi --cpu 2 -o deploy/ --format kserve\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    manifests_parser.add_argument(
        "image", metavar="IMAGE", help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST"
    )
    manifests_parser.add_argument(
        "--model", help="also check the image was built from this model (its content digest)"
    )
    manifests_parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="write the files here"
    )
    manifests_parser.add_argument(
        "--force", action="store_true", help="replace what a non-empty DIR holds"
    )
    manifests_parser.add_argument(
        "--format",
        choices=("kubernetes", "kserve"),
        default="kubernetes",
        help="kubernetes: Deployment, Service, HPA, PDB (default); kserve: an InferenceService",
    )
    manifests_parser.add_argument(
        "--from-test", type=Path, metavar="REPORT", help="a `packager test --json` report"
    )
    manifests_parser.add_argument(
        "--startup-seconds",
        type=float,
        metavar="S",
        help="measured seconds from start to ready (the startup probe allows 3x, at least 30)",
    )
    manifests_parser.add_argument(
        "--memory", help="measured memory use (600Mi, 2Gi); the limit adds 50%% headroom"
    )
    manifests_parser.add_argument(
        "--cpu", default="1", help="CPU request and limit (1, 1.5, 500m); the workers follow it"
    )
    manifests_parser.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="the Deployment's replicas (default: none, the autoscaler's --min-replicas)",
    )
    manifests_parser.add_argument(
        "--min-replicas", type=int, default=2, metavar="N", help="autoscaling floor (default 2)"
    )
    manifests_parser.add_argument(
        "--max-replicas", type=int, default=5, metavar="N", help="autoscaling ceiling (default 5)"
    )
    manifests_parser.add_argument(
        "--name", help="the resources' name, a DNS label (default: from the model's name)"
    )
    manifests_parser.add_argument("--namespace", help="set on every resource and in kustomize")
    manifests_parser.set_defaults(handler=_manifests)


def _manifests(args: argparse.Namespace) -> int:
    image = deploy_inputs.read_image(args.image)
    measured = deploy_inputs.measurements(
        image, report=args.from_test, startup_seconds=args.startup_seconds, memory=args.memory
    )
    if args.model:
        digest = api.inspect_model(args.model, **_source(args)).provenance.content_digest
        deploy_inputs.check_built_from(image, args.model, digest)
    written = manifests.write_manifests(
        image,
        measured,
        manifests.ManifestOptions(
            format=args.format,
            name=args.name,
            namespace=args.namespace,
            cpu=args.cpu,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
        ),
        args.output,
        force=args.force,
    )
    if args.json:
        _print_json(to_jsonable(written))
    else:
        sizing = written.sizing
        sys.stdout.write(
            f"{written.image}: {', '.join(written.files)} in {written.directory}\n"
            f"memory {sizing.memory}, cpu {sizing.cpu} ({sizing.workers} workers), startup "
            f"budget {sizing.startup_budget_seconds}s, grace period "
            f"{sizing.termination_grace_period_seconds}s\n"
        )
    return 0


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The registry, cache and progress options every model-taking command shares."""
    return {
        "options": RegistryOptions(
            tracking_uri=args.tracking_uri,
            registry_uri=args.registry_uri,
            outside_links="skip" if args.skip_outside_links else "error",
        ),
        "cache": ModelCache(args.cache_dir) if args.cache_dir else None,
        "progress": _progress(),
    }


def _progress() -> Progress:
    return RichProgress() if sys.stderr.isatty() else LogProgress()


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(name)s %(levelname)s %(message)s" if debug else "packager: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    # MLflow draws its own tqdm bars on downloads; ours replace them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (never calls ``sys.exit``)."""
    parser = _build_parser()
    _remember_parsers(parser)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would print the top-level usage: show the command's own
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse exits on --help/--version (0) and usage errors (2)
        return int(exc.code or 0)
    _configure_logging(args.debug)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PackagerError as err:
        return _report(err, err.exit_code, args)
    except KeyboardInterrupt:
        sys.stderr.write("packager: interrupted\n")
        return 130
    except Exception as err:
        if args.debug:
            raise
        return _report(err, 1, args, unexpected=True)


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records itself in the parsed arguments (the deepest one
    parsed last wins), so usage errors can name the command the user typed."""
    parser.set_defaults(command_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _remember_parsers(sub)


def _report(
    err: Exception, code: int, args: argparse.Namespace, *, unexpected: bool = False
) -> int:
    if args.debug:
        log.exception("failed")
    message = scrub(getattr(err, "message", None) or str(err))
    hint = getattr(err, "hint", None)
    if unexpected:
        message = f"unexpected {type(err).__name__}: {message}"
        hint = "this is a bug in packager; run again with --debug and report the traceback"
    sys.stderr.write(f"packager: error: {message}\n")
    if hint:
        sys.stderr.write(f"  hint: {scrub(hint)}\n")
    if args.json:
        _print_json(
            {
                "error": {
                    "type": type(err).__name__,
                    "message": message,
                    "hint": scrub(hint) if hint else None,
                    "exit_code": code,
                }
            }
        )
    return code


def entrypoint() -> None:
    """Console-script entry point."""
    code = main()
    if RUST_RUNTIMES & sys.modules.keys():
        exit_before_finalizing(code)
    sys.exit(code)


# Extension modules whose Rust runtime may outlive the interpreter's finalization.
RUST_RUNTIMES = frozenset({"rattler", "rattler_build"})


def exit_before_finalizing(code: int) -> NoReturn:
    """End the process without the interpreter's finalization, once everything is written.

    py-rattler (the conda solver and installer) keeps a Rust runtime whose threads may
    still touch Python while the interpreter finalizes: a process that used it then aborts
    or segfaults after its work is done, about one run in ten here (``packager lock`` on a
    conda model exited 134 or 139 with its lock written). Everything packager writes is
    closed by then (context managers), so the output is flushed and logging shut down,
    and the process exits with its code."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- packager webhook ----------------------------------------------------------------

_WEBHOOK_QUEUE = Path("packager-webhook.db")
_RULES_HELP = """\
rules file (YAML):
  rules:
    - models: "fraud-*"          # glob, or a list of globs, on the registered model name
      aliases: [champion]         # alias moves that trigger a release
      image: "registry.example.com/serving/{name}:{version}"   # {name} {version} {alias}
      release: {test: false, backend: oci, attestations: true, alias: live, force: false}
    - models: "batch-*"           # no aliases and no tags: every new version
      image: "registry.example.com/batch/{name}:{version}"
    - models: "*"
      tags: {deploy: "true"}      # model_version_tag.set with this key (and value)
      image: "registry.example.com/tagged/{name}:{version}"
"""


def _add_webhook_commands(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    common, registry, locking, image_parent = parents
    webhook = commands.add_parser(
        "webhook",
        help="release on MLflow registry events (webhook receiver, jobs, registration)",
        description="Receive MLflow's registry webhooks, queue each event durably before "
        "answering, and release what the rules say, retrying failures; reconcile with the "
        "registry so that no event MLflow dropped is missed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = webhook.add_subparsers(dest="webhook_command", metavar="COMMAND", required=True)
    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument(
        "--queue",
        type=Path,
        default=_WEBHOOK_QUEUE,
        metavar="PATH",
        help=f"the queue's SQLite file (default: ./{_WEBHOOK_QUEUE})",
    )

    serve = sub.add_parser(
        "serve",
        parents=[common, registry, locking, image_parent, queue],
        help="run the receiver: verify, queue, release",
        description="Listen for MLflow's registry webhooks on POST /webhook/mlflow (probes "
        "/livez, /readyz; Prometheus /metrics). Each delivery's X-MLflow-Signature is checked "
        "with the shared secret, the event is committed to the queue before the 2xx answer, "
        "and workers run `packager release` for every job the rules make (or --dispatch "
        "it). The image options (--base-image …) apply to every release.",
        epilog=_RULES_HELP
        + "\nexample:\n  WEBHOOK_SECRET=... packager webhook serve --rules rules.yaml "
        "--secret-env WEBHOOK_SECRET --queue /var/lib/packager/queue.db\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--rules", type=Path, required=True, metavar="FILE", help="rules file")
    secret = serve.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret-env", metavar="VAR", help="the secret is in this variable")
    secret.add_argument("--secret-file", type=Path, metavar="PATH", help="… or in this file")
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8787, help="port (default 8787)")
    serve.add_argument("--certfile", type=Path, metavar="PEM", help="TLS certificate chain")
    serve.add_argument("--keyfile", type=Path, metavar="PEM", help="TLS private key")
    serve.add_argument("--workers", type=int, default=1, help="releases at once (default 1)")
    serve.add_argument(
        "--max-body", type=int, default=1 << 20, metavar="BYTES", help="default 1 MiB"
    )
    serve.add_argument(
        "--retry-limit", type=int, default=5, metavar="N", help="attempts before a job is parked"
    )
    serve.add_argument(
        "--retry-backoff",
        type=float,
        default=30.0,
        metavar="S",
        help="first retry after S seconds, doubling each time (capped at 30 min; default 30)",
    )
    serve.add_argument(
        "--reconcile-interval",
        type=float,
        default=300.0,
        metavar="S",
        help="list what the rules cover and queue what is unreleased, on start and every S "
        "seconds (default 300; 0: on start only)",
    )
    serve.add_argument(
        "--keep-days",
        type=float,
        default=30.0,
        metavar="D",
        help="forget jobs done more than D days ago and their deliveries, at each "
        "reconciliation (default 30, at least 1; failed and parked jobs are kept)",
    )
    serve.add_argument(
        "--dispatch",
        metavar="k8s-jobs:DIR|k8s-jobs:-",
        help="don't release here: write a Kubernetes Job manifest per release into DIR, or "
        "to stdout (for `| kubectl apply -f -`)",
    )
    serve.add_argument(
        "--dispatch-image", metavar="IMAGE", help="with --dispatch: the image that has packager"
    )
    serve.add_argument("--dispatch-namespace", metavar="NS", help="with --dispatch")
    serve.add_argument(
        "--dispatch-secret",
        metavar="NAME",
        help="with --dispatch: a Secret whose keys become the Job's environment "
        "(MLFLOW_TRACKING_TOKEN, PACKAGER_REGISTRY_USERNAME/PASSWORD)",
    )
    serve.set_defaults(handler=_webhook_serve)

    jobs = sub.add_parser(
        "jobs",
        parents=[common, queue],
        help="list the queue's jobs and their states",
        description="List the jobs in the queue (readable while the receiver runs): pending, "
        "running, done, failed (waiting to retry) or parked (out of attempts, or an error "
        "another attempt cannot fix).",
    )
    jobs.add_argument("--state", choices=("pending", "running", "done", "failed", "parked"))
    jobs.set_defaults(handler=_webhook_jobs)

    retry = sub.add_parser(
        "retry",
        parents=[common, queue],
        help="requeue a failed or parked job",
        description="Requeue a failed or parked job now, its attempts reset; the running "
        "receiver picks it up.",
    )
    retry.add_argument("job_id", type=int, metavar="ID")
    retry.set_defaults(handler=_webhook_retry)

    register = sub.add_parser(
        "register",
        parents=[common, registry],
        help="create the webhook in the MLflow registry",
        description="Create a webhook in the MLflow registry (through MLflow's client) that "
        "posts the events to the receiver, signed with the secret from --secret-env. The "
        "MLflow server needs MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY set (else a restart "
        "forgets the secret), and MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and "
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true for a receiver on http or a private address.",
        epilog="example:\n  packager webhook register --url "
        "https://builder.example.com:8787/webhook/mlflow --secret-env WEBHOOK_SECRET\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register.add_argument("--url", required=True, help="the receiver's /webhook/mlflow URL")
    register.add_argument(
        "--events",
        nargs="+",
        default=["model_version.created", "model_version_alias.created", "model_version_tag.set"],
        metavar="EVENT",
        help="default: model_version.created model_version_alias.created model_version_tag.set",
    )
    register.add_argument("--secret-env", required=True, metavar="VAR")
    register.add_argument("--name", default="packager", help="the webhook's name")
    register.set_defaults(handler=_webhook_register)

    test = sub.add_parser(
        "test",
        parents=[common, registry],
        help="have MLflow send its test event to the webhook",
        description="Ask MLflow to send its own example event to the webhook ID and print the "
        "receiver's answer (MLflow's example names the model example_model).",
    )
    test.add_argument("webhook_id", metavar="ID")
    test.add_argument("--event", help="which event (default: the webhook's first)")
    test.set_defaults(handler=_webhook_test)


def _webhook_serve(args: argparse.Namespace) -> int:
    from packager.webhook import dispatch, rules, service, signature, worker  # noqa: PLC0415
    from packager.webhook.queue import RetryPolicy  # noqa: PLC0415
    from packager.webhook.registry import MlflowRegistry  # noqa: PLC0415

    source = _source(args)
    image = _image_options(args)
    release: worker.ReleaseFn
    # Reconciliation compares a version's recorded lock and base with today's only where
    # releases run here: a dispatching receiver locks and loads no base, its Jobs do.
    recipe = None
    if args.dispatch is not None:
        if not args.dispatch_image:
            raise UsageError("--dispatch needs --dispatch-image, the image that runs packager")
        target = dispatch.parse_target(args.dispatch)
        release = dispatch.KubernetesJobs(
            target,
            dispatch.JobTemplate(
                packager_image=args.dispatch_image,
                tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
                registry_uri=args.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or None,
                namespace=args.dispatch_namespace,
                env_from_secret=args.dispatch_secret,
                release_args=_dispatch_release_args(args),
            ),
            stream=sys.stdout,
        )
    else:
        release = worker.release_function(source["options"], args.cache_dir, image=image)
        recipe = worker.recipe_function(source["options"], args.cache_dir, image=image)
    options = service.ServeOptions(
        rules=rules.load_rules(args.rules),
        secret=signature.load_secret(env=args.secret_env, file=args.secret_file),
        queue=args.queue,
        host=args.host,
        port=args.port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        workers=args.workers,
        max_body=args.max_body,
        retry=RetryPolicy(limit=args.retry_limit, base=args.retry_backoff),
        reconcile_interval=args.reconcile_interval,
        keep_days=args.keep_days,
    )
    scheme = "https" if args.certfile else "http"

    def started(port: int) -> None:
        log.info("receiving on %s://%s:%d/webhook/mlflow", scheme, args.host, port)

    service.serve(
        options,
        release,
        lambda: MlflowRegistry(source["options"]),
        started=started,
        recipe=recipe,
    )
    return 0


def _dispatch_release_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The serve flags a dispatched ``packager release`` gets too. Those that name this
    machine's files or may hold credentials cannot go into a Job manifest: refused."""
    local = [
        flag
        for flag, given in (
            ("--lock", args.lock_file is not None),
            ("--wheel-dir", bool(args.wheel_dir)),
            ("--index-url", args.index_url is not None),
            ("--extra-index-url", bool(args.extra_index_url)),
            ("--conda-channel", bool(args.conda_channel)),
        )
        if given
    ]
    if local:
        raise UsageError(
            f"--dispatch cannot pass {', '.join(local)} to the Job: they name files on this "
            "machine or may hold credentials",
            hint="put indexes in the --dispatch-secret Secret (PIP_INDEX_URL, "
            "PIP_EXTRA_INDEX_URL) and wheels or locks in the --dispatch-image, or release "
            "here without --dispatch",
        )
    forwarded: list[str] = []
    if args.base_image:
        forwarded += ["--base-image", args.base_image]
    for package in args.system_package:
        forwarded += ["--system-package", package]
    if not args.bytecode:
        forwarded.append("--no-bytecode")
    if args.keep_tests:
        forwarded.append("--keep-tests")
    forwarded += ["--resolver", args.resolver, "--platform", args.platform]
    if args.python:
        forwarded += ["--python", args.python]
    if args.ignore_conda:
        forwarded.append("--ignore-conda")
    if args.mlflow_skinny:
        forwarded.append("--mlflow-skinny")
    return tuple(forwarded)


def _webhook_jobs(args: argparse.Namespace) -> int:
    from packager.webhook.queue import JobQueue  # noqa: PLC0415

    queue = JobQueue(args.queue, owner=False)
    try:
        jobs = queue.jobs(args.state)
    finally:
        queue.close()
    if args.json:
        _print_json({"jobs": [to_jsonable(job) for job in jobs]})
        return 0
    for job in jobs:
        detail = job.error if job.state in ("failed", "parked") else job.result
        sys.stdout.write(
            f"{job.id:>5} {job.state:<8} {job.spec.model} -> {job.spec.image}"
            f" (attempts {job.attempts}){f': {detail}' if detail else ''}\n"
        )
    return 0


def _webhook_retry(args: argparse.Namespace) -> int:
    from packager.webhook.queue import JobQueue  # noqa: PLC0415

    queue = JobQueue(args.queue, owner=False)
    try:
        job = queue.retry_job(args.job_id)
    finally:
        queue.close()
    if args.json:
        _print_json(to_jsonable(job))
    else:
        sys.stdout.write(f"job {job.id} ({job.spec.model}) queued again\n")
    return 0


def _webhook_register(args: argparse.Namespace) -> int:
    from packager.webhook import signature  # noqa: PLC0415
    from packager.webhook.registry import MlflowRegistry  # noqa: PLC0415

    secret = signature.load_secret(env=args.secret_env)
    hook = MlflowRegistry(_source(args)["options"]).create_webhook(
        name=args.name,
        url=args.url,
        events=args.events,
        secret=secret,
        description="packager webhook serve: releases serving images",
    )
    if args.json:
        _print_json(to_jsonable(hook))
    else:
        sys.stdout.write(f"{hook.webhook_id} {hook.url} ({', '.join(hook.events)})\n")
    return 0


def _webhook_test(args: argparse.Namespace) -> int:
    from packager.webhook.registry import MlflowRegistry  # noqa: PLC0415

    tested = MlflowRegistry(_source(args)["options"]).test_webhook(args.webhook_id, args.event)
    if args.json:
        _print_json(to_jsonable(tested))
    else:
        answer = tested.error or f"HTTP {tested.status}: {(tested.body or '').strip()[:200]}"
        sys.stdout.write(f"{'ok' if tested.success else 'FAILED'}: {answer}\n")
    return 0 if tested.success else 20
