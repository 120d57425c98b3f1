"""``predict``: score a file with the image's model, as ``/invocations`` would.

    docker run -v "$PWD:/data" IMAGE predict --input /data/in.csv --output /data/out.csv
    python -m packager_server predict --model-dir DIR --input FILE --output FILE

=================  =====================================================  ===============
``--content-type`` input                                                  output
=================  =====================================================  ===============
``csv``            CSV with a header line (MLflow's ``text/csv``)         CSV
``jsonl``          JSON lines: one row a line, an object (column to       JSON lines
                   value) or an array (the signature's column order)
``json``           a JSON array of such rows (streamed element by         JSON lines
                   element), or one MLflow request document
                   (``{"dataframe_split": …}``, as ``mlflow models
                   predict -t json`` reads; scored whole, not streamed)
``parquet``        Parquet (needs pyarrow in the image)                   JSON lines
=================  =====================================================  ===============

The default content type comes from the input's suffix (``.csv``, ``.jsonl``/``.ndjson``,
``.json``, ``.parquet``/``.pq``). Output: one prediction per row, in input order. JSON
lines hold one prediction a line (an object per row for DataFrame or named outputs). CSV
has a header line: ``prediction`` for scalar predictions, the output's column names for a
DataFrame, ``0``, ``1``, … for list predictions.

Every chunk of ``--chunk-rows`` rows is turned into the body ``/invocations`` would get
(CSV and Parquet bodies as such; JSON lines as SageMaker batch transform's, see
:mod:`packager_server.platforms`) and scored by the server's :class:`Scorer`, so parsing,
schema enforcement and predictions are the server's. The file is read chunk by chunk and
predictions are written as they come: memory holds a few chunks, whatever the file's size.

Workers: the model is loaded once and ``--workers`` processes are forked from it, unless
the server's serving-mode decision rules a fork out (a fork-unsafe flavor, or load-time
threads that make a forked prediction fail): then one process scores every chunk.

Errors name the row (1-based, data rows: a CSV's header is not one; blank JSON lines are
not counted): a failing chunk is bisected with the same scorer down to the first row that
fails alone. The output is written to a temporary file beside it and renamed into place
only when every row was scored: nothing is left behind on failure.

Exit codes: 0 done, 1 a row (or the input) could not be scored, 2 bad arguments, 3 the
model could not be loaded, 128 + the signal's number when stopped by SIGTERM (``docker
stop``) or SIGINT. A stop is heeded between chunks and while waiting for a worker; the
cleanup and the final rename are not interrupted. While the model loads, nothing is
written yet: a stop ends the process at once (as PID 1 in a container, through a handler
that exits with 128 + the signal). Workers ignore stop signals sent to the whole group
(Ctrl-C): the parent heeds them and kills the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from packager_server.batch_input import BatchError, Chunk, read_chunks, slice_chunk
from packager_server.config import SERVING_MODES, ConfigError, ServerConfig
from packager_server.cpu import available_cpus

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from packager_server.scoring import Answer, Scorer

log = logging.getLogger("packager_server.predict")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOAD_FAILED = 3
DEFAULT_CHUNK_ROWS = 20_000
CONTENT_TYPES = ("csv", "json", "jsonl", "parquet")
_SUFFIXES = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PARQUET = "application/vnd.apache.parquet"
JSON = "application/json"
_PROGRESS_SECONDS = 5.0


_POLL_SECONDS = 0.2
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Stopped(BaseException):
    """SIGTERM (``docker stop``) or SIGINT: unwind, so the partial output is removed."""


_signalled = 0  # the stop signal received, if any


def _stop(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
    """Only note the signal: raising here could interrupt any statement, cleanup
    included; :func:`_check_stop` raises where stopping is safe (between chunks, in
    waits)."""
    global _signalled  # noqa: PLW0603 - a signal handler's one way out
    _signalled = signum


def _stopped_while_loading(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
    """Nothing is written yet: leave at once, with 128 + the signal. A handler rather than
    the default action: as a container's first process (``docker run IMAGE predict``),
    the kernel drops a signal left to its default, and ``docker stop`` would wait for
    its SIGKILL."""
    name = signal.Signals(signum).name
    message = f"packager_server predict: stopped ({name}) while loading the model; "
    os.write(2, (message + "nothing was written\n").encode())
    os._exit(128 + signum)


def _check_stop() -> None:
    if _signalled:
        raise _Stopped


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """No stop signal delivered to this thread in the block (one that comes waits)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    model_dir: Path
    input: Path
    output: Path
    content_type: str
    workers: int
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    serving_mode: Literal["auto", "fork", "spawn"] = "auto"
    fast_path: bool = True
    model_name: str | None = None
    model_version: str | None = None


# -- configuration ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packager_server predict",
        description="Score a file with the model, through the same parsing and schema "
        "enforcement as POST /invocations; write one prediction per row.",
    )
    p.add_argument(
        "--model-dir", type=Path, help="the model directory (default: $PACKAGER_MODEL_DIR)"
    )
    p.add_argument("-i", "--input", type=Path, required=True, help="the file to score")
    p.add_argument("-o", "--output", type=Path, required=True, help="where predictions go")
    p.add_argument(
        "-t",
        "--content-type",
        choices=CONTENT_TYPES,
        help="the input's format (default: from its suffix); csv gives CSV output, the "
        "others JSON lines",
    )
    p.add_argument("--workers", type=int, help="processes (default: the CPU limit)")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"rows per prediction call (default {DEFAULT_CHUNK_ROWS})",
    )
    p.add_argument("--serving-mode", choices=SERVING_MODES, help="as for the server")
    p.add_argument("--no-fast-path", action="store_true", help="as for the server")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    return p


def load_predict_config(argv: Sequence[str], env: dict[str, str] | None = None) -> PredictConfig:
    env = dict(os.environ) if env is None else env
    args = parser().parse_args(argv)
    model_dir = args.model_dir or (
        Path(env["PACKAGER_MODEL_DIR"]) if env.get("PACKAGER_MODEL_DIR") else None
    )
    if model_dir is None:
        raise ConfigError("no model: pass --model-dir or set PACKAGER_MODEL_DIR")
    content_type = args.content_type or _SUFFIXES.get(args.input.suffix.lower())
    if content_type is None:
        raise ConfigError(
            f"--input {args.input}: cannot tell its format from the suffix "
            f"{args.input.suffix or '(none)'!r}: pass --content-type ({', '.join(CONTENT_TYPES)})"
        )
    if not args.input.is_file():
        raise ConfigError(f"--input {args.input}: no such file")
    if not args.output.parent.is_dir():
        raise ConfigError(
            f"--output {args.output}: the directory {args.output.parent} does not exist"
        )
    if args.output.is_dir():
        raise ConfigError(f"--output {args.output}: is a directory; name a file")
    try:
        workers = args.workers or int(env.get("PACKAGER_WORKERS") or 0) or available_cpus()
    except ValueError:
        raise ConfigError(f"PACKAGER_WORKERS={env['PACKAGER_WORKERS']!r}: not a number") from None
    if workers < 1 or args.chunk_rows < 1:
        raise ConfigError("--workers and --chunk-rows must be positive")
    return PredictConfig(
        model_dir=model_dir,
        input=args.input,
        output=args.output,
        content_type=content_type,
        workers=workers,
        chunk_rows=args.chunk_rows,
        serving_mode=_serving_mode(args.serving_mode, env),
        fast_path=not args.no_fast_path,
        model_name=args.model_name,
        model_version=args.model_version,
    )


def _serving_mode(flag: str | None, env: dict[str, str]) -> Literal["auto", "fork", "spawn"]:
    value = flag or env.get("PACKAGER_SERVING_MODE") or "auto"
    if value not in SERVING_MODES:
        raise ConfigError(f"PACKAGER_SERVING_MODE={value!r}: expected auto, fork or spawn")
    return value  # type: ignore[return-value]


# -- scoring a chunk ------------------------------------------------------------------------


def _answer(scorer: Scorer, chunk: Chunk) -> Answer:
    """The server's answer to the chunk as an ``/invocations`` body (MLflow's JSON)."""
    from packager_server.platforms import JSON_LINES, batch_invoker  # noqa: PLC0415

    if chunk.kind == "jsonl":
        invoke = batch_invoker(scorer, "jsonlines", JSON)
        return invoke(b"".join(chunk.records), JSON_LINES[0])
    if chunk.kind == "csv":
        return scorer.invoke(chunk.header + b"".join(chunk.records), "text/csv")
    if chunk.kind == "parquet":
        return scorer.invoke(chunk.header, _PARQUET)
    return scorer.invoke(chunk.header, JSON)


def _message(answer: Answer) -> str:
    try:
        return str(json.loads(answer.body)["message"])
    except (ValueError, KeyError, TypeError):
        return answer.body.decode("utf-8", "replace")[:2000]


def _predictions(answer: Answer) -> list[Any]:
    """One prediction per row from MLflow's ``{"predictions": …}`` (named outputs of a
    tensor model become one object per row, as in batch transform's JSON lines)."""
    decoded = json.loads(answer.body)
    predictions = decoded.get("predictions") if isinstance(decoded, dict) else decoded
    if isinstance(predictions, dict):
        names = list(predictions)
        return [
            dict(zip(names, row, strict=True)) for row in zip(*predictions.values(), strict=True)
        ]
    return predictions if isinstance(predictions, list) else [predictions]


def score_chunk(scorer: Scorer, chunk: Chunk) -> list[Any]:
    """The chunk's predictions, one per row; :class:`BatchError` naming the first row
    that fails (the chunk bisected with the same scorer) otherwise."""
    answer = _answer(scorer, chunk)
    if answer.status == 200:
        predictions = _predictions(answer)
        if chunk.kind != "document" and len(predictions) != chunk.rows:
            raise BatchError(
                f"rows {chunk.first_row}-{chunk.first_row + chunk.rows - 1}: the model "
                f"returned {len(predictions)} predictions for {chunk.rows} rows"
            )
        return predictions
    message = _message(answer)
    if chunk.kind == "document":
        raise BatchError(f"the request document: {message}")
    low, high = 0, chunk.rows
    while high - low > 1:
        middle = (low + high) // 2
        left = _answer(scorer, slice_chunk(chunk, low, middle))
        if left.status != 200:
            high, message = middle, _message(left)
            continue
        right = _answer(scorer, slice_chunk(chunk, middle, high))
        if right.status != 200:
            low, message = middle, _message(right)
            continue
        break  # neither half fails alone: name the range
    first, last = chunk.first_row + low, chunk.first_row + high - 1
    rows = f"row {first}" if first == last else f"rows {first}-{last}"
    raise BatchError(f"{rows}: {message}")


# -- writing --------------------------------------------------------------------------------


def _numbers(predictions: list[Any]) -> bool:
    """Plain ints and finite floats: their JSON and CSV text is ``repr``'s. (``map``
    keeps the loop in C: a million predictions cost the worker ~0.1 s in a generator.)"""
    kinds = set(map(type, predictions))
    if kinds <= {int}:
        return True
    if kinds == {float}:
        return all(map(math.isfinite, predictions))
    return kinds <= {int, float} and all(math.isfinite(p) for p in predictions if type(p) is float)


def _lines(predictions: list[Any]) -> bytes:
    """Numbers (see :func:`_numbers`) a line each."""
    return ("\n".join(map(repr, predictions)) + "\n").encode() if predictions else b""


def json_lines(predictions: list[Any]) -> bytes:
    if _numbers(predictions):
        return _lines(predictions)
    return "".join(json.dumps(p) + "\n" for p in predictions).encode()


def csv_rows(predictions: list[Any]) -> tuple[bytes, bytes]:
    """(header line, rows) of CSV: the header from the first prediction's shape."""
    first = predictions[0] if predictions else None
    if isinstance(first, dict):
        columns = [str(k) for k in first]
    elif isinstance(first, list):
        columns = [str(i) for i in range(len(first))]
    else:
        columns = ["prediction"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    header = text.getvalue().encode()
    if not isinstance(first, (dict, list)) and _numbers(predictions):
        return header, _lines(predictions)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for value in predictions:
        if isinstance(value, dict):
            writer.writerow([_cell(value.get(c)) for c in columns])
        elif isinstance(value, list):
            writer.writerow([_cell(v) for v in value])
        else:
            writer.writerow([_cell(value)])
    return header, text.getvalue().encode()


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"  # as in the JSON answer
    return value


def formatted(predictions: list[Any], output: str) -> tuple[bytes, bytes]:
    """(header, body) of the predictions in the output format (``csv`` or ``jsonl``)."""
    if output == "csv":
        return csv_rows(predictions)
    return b"", json_lines(predictions)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A file that becomes ``path`` only if the block completes; removed otherwise.

    A ``path`` that is not a regular file (``/dev/null``, ``/dev/stdout``, a FIFO) or a
    symbolic link is written in place: renaming over it would replace the device or link
    with a regular file (as root, ``/dev/null`` itself)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        with path.open("wb") as direct:
            yield direct
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with _stop_signals_blocked():
            umask = os.umask(0o022)
            os.umask(umask)
            # mkstemp's 0600 is not what a plain write gives
            Path(temporary).chmod(0o666 & ~umask)
            Path(temporary).replace(path)
    except BaseException:
        with _stop_signals_blocked(), contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise


# -- running ----------------------------------------------------------------------------------


class _Progress:
    def __init__(self) -> None:
        self.rows = 0
        self.started = self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.last >= _PROGRESS_SECONDS:
            self.last = now
            log.info("%d rows scored (%.0f rows/s)", self.rows, self.rows / (now - self.started))

    def done(self, output: Path) -> None:
        seconds = time.monotonic() - self.started
        log.info(
            "%d rows scored in %.1fs (%.0f rows/s); predictions in %s",
            self.rows,
            seconds,
            self.rows / seconds if seconds else 0,
            output,
        )


def run(config: PredictConfig) -> int:
    # While loading there is nothing to remove: the default action ends the process at
    # once, even inside a load's C code. Not as a container's first process (`docker run
    # IMAGE predict`), where the kernel drops a signal left to its default: there a
    # handler leaves (once the load is back in Python).
    loading = _stopped_while_loading if os.getpid() == 1 else signal.SIG_DFL
    for signum in _STOP_SIGNALS:
        signal.signal(signum, loading)
    global _signalled  # noqa: PLW0603 - see _stop
    _signalled = 0

    from packager_server import supervisor  # noqa: PLC0415
    from packager_server.scoring import Scorer  # noqa: PLC0415

    started = time.monotonic()
    server_config = ServerConfig(
        model_dir=config.model_dir,
        model_name=config.model_name,
        model_version=config.model_version,
    )
    try:
        supervisor._import_mlflow()
        before = supervisor._threads()
        model, _ = supervisor.load_model(server_config)
        scorer = Scorer(model, fast_path=config.fast_path)
        warm = time.monotonic()
        supervisor._warm_up(scorer, config.model_dir)
        warm_seconds = time.monotonic() - warm
    except Exception:
        log.exception("could not load the model from %s", config.model_dir)
        return EXIT_LOAD_FAILED
    log.info("model loaded in %.2fs", time.monotonic() - started)
    for signum in _STOP_SIGNALS:  # from now on heeded where stopping is safe
        signal.signal(signum, _stop)
    progress = _Progress()
    try:
        workers = _workers(config, scorer, supervisor, before, warm_seconds)
        _check_stop()  # one that came during the forked probe
        chunks = read_chunks(config.input, config.content_type, config.chunk_rows)
        with atomic_output(config.output) as out:
            output = "csv" if config.content_type == "csv" else "jsonl"
            wrote_header = False
            scored = _scored(scorer, chunks, workers, output)
            with contextlib.closing(scored):  # the workers stopped before the output goes
                for header, body, rows in scored:
                    if not wrote_header:
                        out.write(header)
                        wrote_header = True
                    out.write(body)
                    progress.add(rows)
                    _check_stop()
    except BatchError as err:
        log.error("%s: %s (nothing was written to %s)", config.input, err, config.output)  # noqa: TRY400
        return EXIT_FAILED
    except UnicodeDecodeError as err:
        log.error("%s: not UTF-8 text (%s)", config.input, err.reason)  # noqa: TRY400
        return EXIT_FAILED
    except (_Stopped, KeyboardInterrupt):
        stopped_by = _signalled or signal.SIGINT
        log.error(  # noqa: TRY400
            "stopped (%s) after %d rows; nothing was written to %s",
            signal.Signals(stopped_by).name,
            progress.rows,
            config.output,
        )
        return 128 + stopped_by
    if _signalled:  # it came while the finished output was being put in place
        log.info(
            "%s came after every row was scored: the output is complete",
            signal.Signals(_signalled).name,
        )
    progress.done(config.output)
    return 0


def _workers(
    config: PredictConfig, scorer: Scorer, supervisor: Any, before: dict[int, str], warm: float
) -> int:
    """How many processes score: the server's serving-mode decision, for a batch."""
    if config.workers == 1:
        return 1
    if config.serving_mode == "spawn":
        log.info("one process (--serving-mode spawn: the model is not forked)")
        return 1
    if config.serving_mode == "auto":
        unsafe = supervisor.fork_unsafe_reason(config.model_dir)
        left = {t for t in supervisor._threads() if t not in before}
        if unsafe is None and left:
            probe = supervisor._forked_probe(scorer, config.model_dir, warm)
            if probe is not None:
                unsafe = f"loading left {len(left)} thread(s) running, and {probe}"
        if unsafe is not None:
            log.info("one process: %s", unsafe)
            return 1
    log.info("%d worker processes forked from the loaded model", config.workers)
    return config.workers


Scored = Generator[tuple[bytes, bytes, int], None, None]


def _scored(scorer: Scorer, chunks: Iterator[Chunk], workers: int, output: str) -> Scored:
    """(header, formatted predictions, rows) per chunk, in input order."""
    if workers == 1:
        for chunk in chunks:
            yield (*formatted(score_chunk(scorer, chunk), output), chunk.rows)
        return
    yield from _forked(scorer, chunks, workers, output)


def _forked(scorer: Scorer, chunks: Iterator[Chunk], workers: int, output: str) -> Scored:
    """Chunks dealt round-robin to forked workers, one in flight each; their answers read
    back in the same order, so output order is input order and memory holds one chunk per
    worker. Parent and worker strictly alternate on each pipe: neither can block the
    other."""
    from multiprocessing import Pipe  # noqa: PLC0415

    gc.freeze()  # the loaded model's pages stay shared (no collect first: see supervisor)
    pipes: list[Connection] = []
    pids: list[int] = []
    for _ in range(workers):
        ours, theirs = Pipe()
        pid = os.fork()
        if pid == 0:
            for other in pipes:
                other.close()
            ours.close()
            _work(scorer, theirs, output)  # never returns
        theirs.close()
        pipes.append(ours)
        pids.append(pid)
    pending: deque[tuple[int, Chunk]] = deque()
    finished = False
    try:
        for index, chunk in zip(range(workers), chunks, strict=False):
            _send(pipes[index], chunk)
            pending.append((index, chunk))
        while pending:
            index, chunk = pending.popleft()
            ok, *result = _receive(pipes[index], chunk)
            if not ok:
                raise BatchError(result[0])
            yield result[0], result[1], chunk.rows
            following = next(chunks, None)
            if following is not None:
                _send(pipes[index], following)
                pending.append((index, following))
        finished = True
    finally:
        with _stop_signals_blocked():
            for pipe in pipes:
                pipe.close()
            for pid in pids:
                if not finished:  # stopped early: the workers' chunks are not wanted
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def _died(chunk: Chunk) -> BatchError:
    last = chunk.first_row + chunk.rows - 1
    return BatchError(
        f"rows {chunk.first_row}-{last}: the worker scoring them died (out of memory?)"
    )


def _send(pipe: Connection, chunk: Chunk) -> None:
    try:
        pipe.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        raise _died(chunk) from None


def _receive(pipe: Connection, chunk: Chunk) -> Any:
    """The worker's answer for the chunk; a stop signal is heeded while waiting."""
    while not pipe.poll(_POLL_SECONDS):
        _check_stop()
    try:
        return pipe.recv()
    except EOFError:
        raise _died(chunk) from None


def _work(scorer: Scorer, pipe: Connection, output: str) -> None:
    code = 0
    try:
        # Stopping is the parent's: it kills the workers once it has heeded the signal. A
        # Ctrl-C or a service manager signals the whole group; workers dying of it first
        # made the parent report a dead worker ("out of memory?") instead of the stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            try:
                chunk = pipe.recv()
            except EOFError:
                break
            try:
                pipe.send((True, *formatted(score_chunk(scorer, chunk), output)))
            except BatchError as err:
                pipe.send((False, str(err)))
            except Exception as err:  # noqa: BLE001 - reported with the rows, then stop
                last = chunk.first_row + chunk.rows - 1
                pipe.send((False, f"rows {chunk.first_row}-{last}: {type(err).__name__}: {err}"))
    except BaseException:  # noqa: BLE001 - a worker never returns into the parent's code
        code = 1
    finally:
        os._exit(code)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="packager_server predict: %(message)s"
    )
    try:
        config = load_predict_config(argv)
    except ConfigError as err:
        sys.stderr.write(f"packager_server predict: error: {err}\n")
        return EXIT_CONFIG
    return run(config)
