"""The master process: bind, load the model once, fork workers, keep them alive.

Life cycle::

    bind the port ─► answer probes while loading (live: 200, ready: 503)
                  ─► load the model, warm it up with its serving example, gc.freeze()
                  ─► fork N workers (copy-on-write: they share the loaded model)
                  ─► respawn any worker that dies (crash, or retired after a timeout)
                  ─► answer for a worker that cannot: stuck in a prediction 1 s past
                     --timeout (C code holding the GIL): stop it, answer its requests
                     (504 to the prediction), kill and respawn it; and for one that died
    SIGTERM/SIGINT ─► close the listening socket; workers take what waits in its
                      backlog, answer every request they accepted within
                      --graceful-timeout, and stop; then exit 0
                      (while loading: stop loading, close the socket, exit 0)

Workers register every connection they accept with the supervisor, which keeps a copy of
it: see :mod:`packager_server.takeover` for how it answers for them, and when it must not.
The supervisor's loop therefore never sleeps long: it reads the workers' channels 20
times a second, and schedules respawns rather than sleeping through a backoff.

Exit codes: 0 after a clean shutdown, 2 for bad configuration or a busy port, 3 when the
model cannot be loaded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packager_server.config import ConfigError, ServerConfig, load_config
from packager_server.connections import LoadingResponder
from packager_server.logs import configure_logging, log_access

if TYPE_CHECKING:
    from collections import Counter

    from packager_server.takeover import ConnectionTable, Takeover

log = logging.getLogger("packager_server")

EXIT_CONFIG = 2
EXIT_LOAD_FAILED = 3
EXIT_RETIRED = 70  # a worker that stopped itself after a request timeout
_RESTART_BACKOFF_MAX = 30.0
_RETIRE_HARD_EXIT_SECONDS = 3.0
# A prediction still running this long after its timeout is stuck where its worker cannot
# answer (C code holding the GIL, or never returning to the event loop): the worker had
# its chance to answer the 504 itself; the supervisor answers it, and kills the worker.
TAKEOVER_GRACE_SECONDS = 1.0
_STOPPING_WAIT_SECONDS = 1.0  # for a SIGSTOPped worker to be reported stopped
# The supervisor's loop: how often it reads the workers' channels, reaps and looks for
# stuck workers.
_TICK_SECONDS = 0.05
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# The forked probe's deadline: 20 times the warm-up prediction, within these bounds (s).
_PROBE_DEADLINE_MIN = 3.0
_PROBE_DEADLINE_MAX = 30.0
# Spawn mode: how many times the first worker may die (not a load error) before serving.
_FIRST_WORKER_TRIES = 3
# Flavors whose runtime starts thread pools when it loads (and that don't survive a fork):
# their models are spawned without loading them here first. TensorFlow's hang every
# forked prediction; XGBoost's OpenMP (libgomp) pool and a transformers pipeline's threads
# hang the forked probe (benchmarks/flavor_bench.py shows each flavor's mode). Other
# flavors are decided by evidence after loading.
FORK_UNSAFE_FLAVORS = frozenset({"tensorflow", "keras", "xgboost", "transformers"})
# How a started worker learns its row and inherited descriptors (JSON), and how a
# supervisor that re-executes itself in spawn mode keeps its listening socket and reason.
_WORKER_ENV = "PACKAGER_SERVER_WORKER"
_LISTEN_FD_ENV = "PACKAGER_SERVER_LISTEN_FD"
_REASON_ENV = "PACKAGER_SERVER_SPAWN_REASON"


@dataclass(frozen=True)
class _Serving:
    """What a worker serves with: in fork mode the supervisor's, in spawn mode its own."""

    config: ServerConfig
    scorer: Any
    metrics: Any
    info: Any
    sock: socket.socket
    connections: ConnectionTable
    channel: socket.socket  # the worker's end of its channel to the supervisor


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(argv)
    except ConfigError as err:
        sys.stderr.write(f"packager_server: error: {err}\n")
        return EXIT_CONFIG
    configure_logging(config)
    started_as = os.environ.pop(_WORKER_ENV, None)  # not for the model's own subprocesses
    if started_as is not None:
        return run_started_worker(config, json.loads(started_as))
    return Supervisor(config, argv).run()


class Supervisor:
    def __init__(self, config: ServerConfig, argv: Sequence[str] = ()) -> None:
        self.config = config
        self.argv = list(argv)  # how a started worker (or a re-executed self) is configured
        self.mode = "fork"
        self._threads_left: dict[int, str] = {}  # thread id -> name, left by the load
        self._metrics_fd = self._connections_fd = self._ready_read = self._ready_write = -1
        self._go_read = self._go_write = -1
        self._warm_seconds = 0.0
        self.workers: dict[int, int] = {}  # pid -> row
        self._births: dict[int, float] = {}  # pid -> when it was started
        self._killed: set[int] = set()  # pids killed stuck in a prediction, not yet reaped
        self._due: dict[int, float] = {}  # row -> when to start its next worker
        self._stopping = False
        self._stop_signal = signal.SIGTERM.value
        self._loading = False  # the signal handlers interrupt the load
        self._failures: dict[int, int] = {}  # row -> consecutive quick deaths

    def run(self) -> int:
        try:
            sock = _inherited_socket() or _bind(self.config.host, self.config.port)
        except OSError as err:
            # A busy port is an operator error, not a bug: no traceback.
            log.error(  # noqa: TRY400
                "cannot listen on %s:%d: %s", self.config.host, self.config.port, err
            )
            return EXIT_CONFIG
        _raise_descriptor_limit()
        # From now on SIGTERM/SIGINT stop the server; while loading, by interrupting it.
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        responder = LoadingResponder(sock, header_timeout=self.config.header_timeout)
        responder.start()
        self.mode, reason = self._mode_before_loading()
        if self.mode == "spawn":
            return self._serve_started_workers(sock, responder, reason)
        try:
            loaded = self._load()
        except _Interrupted as stop:
            responder.stop(shutting_down=True)
            sock.close()
            log.info("received %s while loading the model; stopping", stop.signal_name)
            log.info("stopped")
            return 0
        if loaded and not self._stopping and self._threads_left:
            names = ", ".join(sorted(set(self._threads_left.values())))
            left = f"loading the model left {len(self._threads_left)} thread(s) running ({names})"
            if self.config.serving_mode == "fork":
                log.warning("forking anyway (--serving-mode fork): %s", left)
            else:
                # Many runtimes' threads survive a fork (OpenBLAS and onnxruntime shut their
                # pools down around it); others hang the child (TensorFlow, libgomp). Ask a
                # forked child to predict, with a deadline, rather than guess by thread.
                failed = _forked_probe(self.scorer, self.config.model_dir, self._warm_seconds)
                if failed is not None and not self._stopping:
                    responder.stop()
                    why = f"{left}, and {failed}: forked workers could hang"
                    self._respawn_in_spawn_mode(sock, why)  # does not return
                if failed is None:
                    log.info(
                        "%s; a forked child answered the serving example: forking is safe", left
                    )
        responder.stop(shutting_down=not loaded or self._stopping)
        if not loaded:
            return EXIT_LOAD_FAILED
        self.sock = sock
        if self._stopping:  # the signal came between the load and here
            sock.close()
            log.info("stopped")
            return 0
        log.info(
            "model %s version %s loaded in %.2fs; forking %d worker(s) on %s:%d "
            "(serving mode fork: they share the loaded model)",
            self.info.model_name,
            self.info.model_version,
            self.info.load_seconds,
            self.config.workers,
            self.config.host,
            self.config.port,
        )
        # Objects alive now are shared with every worker: keep the collector off them so
        # it doesn't dirty (and so copy) their pages. No gc.collect() first: after a load
        # it found nothing to free and took 0.1 s of the start (the wine model, MLflow's
        # 220,000 objects); a few frozen cycles cost less than that.
        gc.freeze()
        for row in range(self.config.workers):
            self._spawn(row)
        return self._supervise()

    def _load(self) -> bool:
        """Load and warm up the model; False (logged) if it cannot be loaded.

        Raises :class:`_Interrupted` when SIGTERM or SIGINT arrives meanwhile: the signal
        handler raises it wherever the load is (in Python code; a load stuck in C code
        sees it when it returns to Python).
        """
        self._loading = True
        try:
            if self._stopping:
                raise _Interrupted(self._stop_signal)
            started = time.monotonic()
            try:
                _import_mlflow()  # its own threads (if any) are not the model's
                before = _threads()
                model, info = load_model(self.config)
            except Exception:
                log.exception("could not load the model from %s", self.config.model_dir)
                return False
            # Imported after MLflow's environment is set up, and before forking so that
            # workers share them instead of importing them each.
            import uvicorn  # noqa: F401, PLC0415

            from packager_server.app import ServerInfo  # noqa: PLC0415
            from packager_server.metrics import SharedMetrics  # noqa: PLC0415
            from packager_server.scoring import Scorer  # noqa: PLC0415
            from packager_server.takeover import ConnectionTable  # noqa: PLC0415

            scorer = Scorer(model, fast_path=self.config.fast_path, debug=self.config.debug)
            warm_started = time.monotonic()
            _warm_up(scorer, self.config.model_dir)
            self._warm_seconds = time.monotonic() - warm_started
            # Evidence for --serving-mode auto: threads the loader and the first prediction
            # started (OpenMP, CUDA, a framework's pools) are gone in a forked worker, and
            # any lock one of them held stays held there.
            self._threads_left = {t: n for t, n in _threads().items() if t not in before}
            self.info = ServerInfo(load_seconds=time.monotonic() - started, **info)
            self.scorer, self.metrics = scorer, SharedMetrics(self.config.workers)
            self._start_takeover(ConnectionTable(self.config.workers))
            return True
        finally:
            # A signal from here on only sets _stopping (the handler raises no more); one
            # that arrives before this line still raises, out of this method.
            self._loading = False

    def _on_stop(self, signum: int, frame: object) -> None:  # noqa: ARG002 - signal API
        first = not self._stopping
        self._stopping = True
        self._stop_signal = signum
        if self._loading:
            raise _Interrupted(signum)  # logged by run(), outside the interrupted code
        if first:
            log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)

    def _start_takeover(self, connections: ConnectionTable) -> None:
        from packager_server.takeover import Takeover  # noqa: PLC0415

        config = self.config

        def access(**fields: Any) -> None:
            if config.access_log:
                log_access(config.log_format, **fields)

        self.connections = connections
        self.takeover: Takeover = Takeover(connections, self.metrics.observe, access)

    def _spawn(self, row: int) -> None:
        self.metrics.reset_row(row)  # the row's previous worker may have died predicting
        channel = self.takeover.connect(row)
        try:
            pid = self._start(row, channel) if self.mode == "spawn" else self._fork(row, channel)
        finally:
            channel.close()  # the worker has its own copy
        self.workers[pid] = row
        self._births[pid] = time.monotonic()

    def _fork(self, row: int, channel: socket.socket) -> int:
        # Hold SIGTERM/SIGINT across the fork until the worker has its own handlers: one
        # arriving before would run the supervisor's handler in the worker, and be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self.takeover.forget()  # the supervisor's copies of connections, channels
                shared = _Serving(
                    self.config,
                    self.scorer,
                    self.metrics,
                    self.info,
                    self.sock,
                    self.connections,
                    channel,
                )
                code = _run_worker(shared, row)
            except BaseException:
                log.exception("worker %d failed", row)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return pid

    def _supervise(self) -> int:
        if self.mode == "fork":
            # Workers are serving: the supervisor is idle, so it runs MLflow's load-time
            # checks now, in its main thread (a thread here could hold a lock across a
            # fork). Started workers run them themselves. Meanwhile workers keep what
            # they would tell the supervisor (takeover.Lifeline's outbox).
            check_environment(self.config.model_dir, self.scorer.model)
        while not self._stopping:
            self.takeover.pump(_TICK_SECONDS)
            for pid, status in _reap():
                self._exited(pid, status)
            self._rescue_stuck()  # after reaping: a dead worker's busy mark is not read
            now = time.monotonic()
            for row in [row for row, when in self._due.items() if when <= now]:
                del self._due[row]
                self._spawn(row)
        return self._shutdown()

    def _exited(self, pid: int, status: int) -> None:
        """A worker ended: answer what it leaves outstanding, and schedule its successor."""
        from packager_server.takeover import Farewell  # noqa: PLC0415

        row = self.workers.pop(pid, None)
        if row is None:
            return
        lived = time.monotonic() - self._births.pop(pid, 0.0)
        code = os.waitstatus_to_exitcode(status)
        stuck = pid in self._killed
        self._killed.discard(pid)
        ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        retry = "the server is stopping" if self._stopping else "worker restarting; retry"
        told = self.takeover.release(row, Farewell(timeout=None, died=ended, retry=retry))
        if told:
            log.warning(
                "worker %d (pid %d) %s; the supervisor answered %s for it",
                row,
                pid,
                ended,
                _tally(told),
            )
        if self._stopping:
            return
        if stuck:
            why = "was stuck in a prediction"
        elif code == EXIT_RETIRED:
            why = "retired after a request timeout"
        else:
            why = ended
        # A worker killed stuck is the request's doing, not a crash loop of the worker's.
        quick = lived < 5.0 and not stuck
        self._failures[row] = self._failures.get(row, 0) + 1 if quick else 0
        log.warning("worker %d (pid %d) %s; starting a new one", row, pid, why)
        self.metrics.worker_restarted(row)
        delay = min(_RESTART_BACKOFF_MAX, 0.5 * 2 ** self._failures[row]) if quick else 0
        self._due[row] = time.monotonic() + delay

    # -- spawn mode ---------------------------------------------------------------------

    def _mode_before_loading(self) -> tuple[str, str]:
        """("fork" | "spawn", why), from the configuration and the model's flavors."""
        reason = os.environ.pop(_REASON_ENV, "")
        if self.config.serving_mode != "auto":
            return self.config.serving_mode, reason or f"--serving-mode {self.config.serving_mode}"
        unsafe = fork_unsafe_reason(self.config.model_dir)
        return ("spawn", unsafe) if unsafe else ("fork", "")

    def _respawn_in_spawn_mode(self, sock: socket.socket, reason: str) -> None:
        """Start over as a supervisor in spawn mode, without this process's copy of the
        model: execve keeps the listening socket (connections wait in its backlog)."""
        log.warning("serving mode spawn: %s; restarting without the loaded model", reason)
        env = {
            **os.environ,
            "PACKAGER_SERVING_MODE": "spawn",
            _LISTEN_FD_ENV: str(sock.fileno()),
            _REASON_ENV: reason,
        }
        argv = [sys.executable, "-m", "packager_server", *self.argv]
        os.execve(sys.executable, argv, env)  # noqa: S606 - this interpreter, argv list

    def _serve_started_workers(
        self, sock: socket.socket, responder: LoadingResponder, reason: str
    ) -> int:
        """Spawn mode: each worker is a new interpreter that loads the model itself; the
        responder answers probes until the first of them serves."""
        from packager_server.metrics import SharedMetrics  # noqa: PLC0415
        from packager_server.takeover import ConnectionTable  # noqa: PLC0415

        self.sock = sock
        self.metrics, self._metrics_fd = SharedMetrics.in_memfd(self.config.workers)
        connections, self._connections_fd = ConnectionTable.in_memfd(self.config.workers)
        self._start_takeover(connections)
        self._ready_read, self._ready_write = os.pipe()
        os.set_inheritable(self._ready_write, True)
        os.set_blocking(self._ready_read, False)
        # Workers wait on this pipe between loading and accepting, until the supervisor
        # closes its end: the loading responder accepts on the same socket, and a request
        # it took after a worker answered /ready would get 503 "loading".
        self._go_read, self._go_write = os.pipe()
        os.set_inheritable(self._go_read, True)
        log.info(
            "serving mode spawn: %s; starting %d worker(s) on %s:%d, each loading the model "
            "(the first alone, the others once it serves)",
            reason,
            self.config.workers,
            self.config.host,
            self.config.port,
        )
        # One worker first: N interpreters loading at once on fewer cores each take about
        # N/cores times as long, and the server would answer nothing until one is done.
        # The first serves after one load; the others load while it does.
        self._spawn(0)
        tries = 1
        while not self._stopping and not self._a_worker_serves():
            time.sleep(0.05)
            for pid, status in _reap():
                if pid in self.workers:
                    self.takeover.drop(self.workers.pop(pid))  # it never had a connection
                if self._stopping:  # a stop sent to the whole group (Ctrl-C) ended it too
                    continue
                code = os.waitstatus_to_exitcode(status)
                log.error("a worker exited with %d before serving", code)
                if code != EXIT_LOAD_FAILED and tries < _FIRST_WORKER_TRIES:
                    tries += 1  # killed while loading (the OOM killer?): once more
                    self._spawn(0)
                if code == EXIT_LOAD_FAILED or not self.workers:
                    responder.stop(shutting_down=True)
                    self._stopping = True
                    self._stop_workers()
                    return EXIT_LOAD_FAILED
        responder.stop(shutting_down=self._stopping)
        os.close(self._go_write)  # every worker, now and later, may accept
        if not self._stopping:
            for row in range(1, self.config.workers):
                self._spawn(row)
        return self._supervise()

    def _start(self, row: int, channel: socket.socket) -> int:
        """A worker as a new interpreter (no fork of this process), given the listening
        socket, the metrics block, the connection table, its channel and the ready pipe
        as inherited descriptors."""
        channel.set_inheritable(True)
        spec = {
            "row": row,
            "listen_fd": self.sock.fileno(),
            "metrics_fd": self._metrics_fd,
            "connections_fd": self._connections_fd,
            "channel_fd": channel.fileno(),
            "ready_fd": self._ready_write,
            "go_fd": self._go_read,
        }
        env = {**os.environ, _WORKER_ENV: json.dumps(spec), "PACKAGER_SERVING_MODE": "spawn"}
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "packager_server", *self.argv],
            env,
            setsigmask=(),
            setsigdef=tuple(_STOP_SIGNALS),
        )

    def _a_worker_serves(self) -> bool:
        try:
            return bool(os.read(self._ready_read, 64))
        except BlockingIOError:
            return False

    def _rescue_stuck(self) -> None:
        """Answer for each worker stuck in a prediction past --timeout + the grace, and
        kill it (its successor is started when it is reaped)."""
        from packager_server.takeover import Farewell  # noqa: PLC0415

        limit = self.config.timeout + TAKEOVER_GRACE_SECONDS
        for pid, row in list(self.workers.items()):
            if pid in self._killed or self.metrics.busy_for(row) <= limit:
                continue
            if not self._stop(pid):
                continue  # it ended meanwhile, and was reaped
            busy = self.metrics.busy_for(row)
            if busy <= limit:  # its prediction ended before it stopped: let it answer
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                continue
            # Killed before anything is written: a stopped process never runs again.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._killed.add(pid)
            farewell = Farewell(
                timeout=self.config.timeout, retry="worker restarting after a timeout; retry"
            )
            told = self.takeover.release(row, farewell)
            self.metrics.reset_row(row)
            log.error(
                "worker %d (pid %d) has been predicting for over %.1fs (--timeout %g), in "
                "code that holds the GIL or never returns to its event loop; the supervisor "
                "answered %s for it and killed it",
                row,
                pid,
                busy,
                self.config.timeout,
                _tally(told),
            )

    def _stop(self, pid: int) -> bool:
        """SIGSTOP a worker and wait until it has stopped; False if it ended meanwhile.

        Stopped, it cannot write a byte or change a record: what the supervisor reads
        then is final, with no lock between the two processes."""
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + _STOPPING_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return False
            if got == pid:
                if os.WIFSTOPPED(status):
                    return True
                self._exited(pid, status)
                return False
            time.sleep(0.001)
        # Not reported stopped: it is in the kernel (uninterruptible), running no code of
        # its own; it stops on its way out.
        return True

    def _shutdown(self) -> int:
        self.sock.close()  # new connections are refused from now on
        self._stop_workers()
        log.info("stopped")
        return 0

    def _stop_workers(self) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.graceful_timeout + 5
        while self.workers and time.monotonic() < deadline:
            self.takeover.pump(0.05)
            for pid, status in _reap():
                self._exited(pid, status)
            self._rescue_stuck()  # a prediction stuck past its deadline still gets a 504
        for pid in list(self.workers):
            log.warning("worker pid %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:  # answer for the killed ones
            for pid, status in _reap():
                self._exited(pid, status)
            self.takeover.pump(0.02)
        self.takeover.finish(1.0)


class _Interrupted(BaseException):
    """SIGTERM or SIGINT while the model loads; a BaseException so no loader catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def _tally(told: Counter[int]) -> str:
    return ", ".join(f"{count} x {status}" for status, count in sorted(told.items())) or "nothing"


def _raise_descriptor_limit() -> None:
    """The supervisor holds a copy of each worker's connections: allow it as many open
    files as the hard limit allows (often 1024 by default, for one process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reap() -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        found.append((pid, status))


def run_started_worker(config: ServerConfig, spec: dict[str, int]) -> int:
    """A worker in spawn mode: load the model in this fresh interpreter, say so on the
    ready pipe, then serve the inherited socket like a forked worker."""
    from packager_server.app import ServerInfo  # noqa: PLC0415
    from packager_server.metrics import SharedMetrics  # noqa: PLC0415
    from packager_server.scoring import Scorer  # noqa: PLC0415
    from packager_server.takeover import ConnectionTable  # noqa: PLC0415

    row = int(spec["row"])
    # Stopped while loading: the kernel's default ends the process at once. A Python
    # handler would run only once the interpreter is back in Python, and a framework's
    # load can spend minutes in C (the server then waited out --graceful-timeout and
    # killed the worker). _run_worker installs the serving handlers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a terminal's Ctrl-C reaches workers too
    sock = socket.socket(fileno=int(spec["listen_fd"]))
    metrics = SharedMetrics(config.workers, int(spec["metrics_fd"]))
    connections = ConnectionTable(config.workers, int(spec["connections_fd"]))
    os.close(int(spec["connections_fd"]))  # mapped; not for the model's subprocesses
    channel = socket.socket(fileno=int(spec["channel_fd"]))
    started = time.monotonic()
    try:
        model, info = load_model(config)
        scorer = Scorer(model, fast_path=config.fast_path, debug=config.debug)
        _warm_up(scorer, config.model_dir)
    except Exception:
        log.exception("worker %d could not load the model from %s", row, config.model_dir)
        return EXIT_LOAD_FAILED
    served = ServerInfo(load_seconds=time.monotonic() - started, serving_mode="spawn", **info)
    os.write(int(spec["ready_fd"]), bytes([row % 256]))
    os.close(int(spec["ready_fd"]))
    os.read(int(spec["go_fd"]), 1)  # end of file once the loading responder has stopped
    os.close(int(spec["go_fd"]))
    log.info("worker %d loaded the model in %.2fs; serving", row, served.load_seconds)
    if row == 0:  # no fork follows in this process: a thread is safe here
        threading.Thread(
            target=check_environment, args=(config.model_dir, model), daemon=True
        ).start()
    return _run_worker(_Serving(config, scorer, metrics, served, sock, connections, channel), row)


def _run_worker(supervisor: _Serving, row: int) -> int:
    import uvicorn  # noqa: PLC0415 - imported by the master before forking (see run)

    from packager_server.app import (  # noqa: PLC0415
        DrainingServer,
        JsonErrorsH11,
        JsonErrorsHttpTools,
        ScoringApp,
    )
    from packager_server.takeover import Lifeline  # noqa: PLC0415

    config = supervisor.config
    lifeline = Lifeline(supervisor.channel, supervisor.connections, row)
    # uvicorn re-raises the signal it caught once it has shut down; end quietly then.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by _spawn
    server: DrainingServer | None = None

    def retire() -> None:
        if server is not None:
            server.take_backlog = False  # the listen backlog waits for the replacement
            server.should_exit = True
        # A stuck prediction thread would block interpreter exit: leave hard, soon.
        threading.Timer(_RETIRE_HARD_EXIT_SECONDS, os._exit, args=(EXIT_RETIRED,)).start()

    app = ScoringApp(
        scorer=supervisor.scorer,
        config=config,
        metrics=supervisor.metrics,
        row=row,
        info=supervisor.info,
        retire=retire,
        lifeline=lifeline,
    )
    try:
        import httptools  # noqa: F401, PLC0415 - the faster parser, when installed

        protocol: type[JsonErrorsHttpTools | JsonErrorsH11] = JsonErrorsHttpTools
    except ImportError:
        protocol = JsonErrorsH11
    http: Any = functools.partial(protocol, header_timeout=config.header_timeout, lifeline=lifeline)
    try:
        import uvloop  # noqa: F401, PLC0415

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    server = DrainingServer(
        uvicorn.Config(
            app,
            http=http,
            loop=loop,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=max(1, int(config.graceful_timeout)),
        )
    )
    server.run(sockets=[supervisor.sock])
    return EXIT_RETIRED if app.retiring else 0


def _import_mlflow() -> None:
    # An image must never phone home: MLflow 3 sends usage telemetry unless told not to.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    import mlflow.pyfunc  # noqa: F401, PLC0415


def load_model(config: ServerConfig) -> tuple[Any, dict[str, str]]:
    """Load the model with MLflow, as ``mlflow models serve`` does; returns it and labels."""
    _import_mlflow()
    import mlflow  # noqa: PLC0415
    import mlflow.pyfunc  # noqa: PLC0415

    # MLflow's two load-time warnings (installed packages vs the model's requirements, and
    # Python version) cost ~0.8 s here, mostly scanning every installed distribution. They
    # change nothing about the model, so the supervisor reports them once workers serve
    # (see check_environment) instead of before the model is ready.
    model = mlflow.pyfunc.load_model(str(config.model_dir), suppress_warnings=True)
    meta = _registered_model_meta(config.model_dir)
    return model, {
        "model_name": config.model_name or meta.get("model_name") or config.model_dir.name,
        "model_version": config.model_version or meta.get("model_version") or "",
        "mlflow_version": mlflow.__version__,
    }


def check_environment(model_dir: Path, model: Any) -> None:
    """Log MLflow's own warnings about this environment against the model's needs.

    The same checks ``mlflow.pyfunc.load_model`` runs unless ``suppress_warnings``; they
    only log. ``model`` is the loaded pyfunc model: its ``metadata`` is the parsed MLmodel.
    They use MLflow internals, so a change there costs the warnings, never the server.
    """
    try:
        from mlflow.pyfunc import (  # noqa: PLC0415
            FLAVOR_NAME,
            PY_VERSION,
            _get_pip_requirements_from_model_path,
            _warn_potentially_incompatible_py_version_if_necessary,
        )
        from mlflow.utils.requirements_utils import (  # noqa: PLC0415
            warn_dependency_requirement_mismatches,
        )

        warn_dependency_requirement_mismatches(
            _get_pip_requirements_from_model_path(str(model_dir))
        )
        conf = model.metadata.flavors.get(FLAVOR_NAME) or {}
        _warn_potentially_incompatible_py_version_if_necessary(  # type: ignore[no-untyped-call]
            model_py_version=conf.get(PY_VERSION)
        )
    except Exception:
        log.debug("MLflow's environment checks could not run", exc_info=True)


def _registered_model_meta(model_dir: Path) -> dict[str, str]:
    import yaml  # noqa: PLC0415 - a dependency of MLflow

    try:
        data = yaml.safe_load((model_dir / "registered_model_meta").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _warm_up(scorer: Any, model_dir: Path) -> None:
    """One prediction before forking, so every worker starts with warm caches."""
    example = model_dir / "serving_input_example.json"
    if not example.is_file():
        return
    answer = scorer.invoke(example.read_bytes(), "application/json")
    log.info("warm-up prediction on the serving example: %d (%s path)", answer.status, answer.route)


def _forked_probe(scorer: Any, model_dir: Path, warm_seconds: float) -> str | None:
    """Fork a child that predicts the serving example; None if it answered in time, else
    what went wrong. A child that hangs is killed after a deadline far above the time the
    same prediction took here."""
    example = model_dir / "serving_input_example.json"
    if not example.is_file():
        return "there is no serving example to try a forked prediction with"
    body = example.read_bytes()
    deadline = min(_PROBE_DEADLINE_MAX, max(_PROBE_DEADLINE_MIN, 20 * warm_seconds))
    pid = os.fork()
    if pid == 0:  # the child: predict, nothing else (no logging, no sockets), and leave
        code = 1
        try:
            code = 0 if scorer.invoke(body, "application/json").status == 200 else 1
        finally:
            os._exit(code)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return None if code == 0 else f"a forked child's prediction failed ({code})"
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return f"a forked child's prediction did not end within {deadline:.1f}s"


def _threads() -> dict[int, str]:
    """This process's threads (native ones too: OpenMP, CUDA), by id, with their names."""
    try:
        tasks = [p.name for p in Path("/proc/self/task").iterdir()]
    except OSError:  # no /proc: Python's own threads are what can be seen
        return {t.native_id or 0: t.name for t in threading.enumerate()}
    found = {}
    for task in tasks:
        try:
            found[int(task)] = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
    return found


def fork_unsafe_reason(model_dir: Path) -> str | None:
    """Why the model's flavors rule out forking from a loaded copy, or None."""
    unsafe = sorted(FORK_UNSAFE_FLAVORS & _flavors(model_dir))
    if not unsafe:
        return None
    return f"the model's {', '.join(unsafe)} runtime keeps thread pools that do not survive a fork"


def _flavors(model_dir: Path) -> set[str]:
    import yaml  # noqa: PLC0415 - a dependency of MLflow

    try:
        data = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return set()  # the load reports what is wrong with MLmodel
    flavors = data.get("flavors") if isinstance(data, dict) else None
    return set(flavors) if isinstance(flavors, dict) else set()


def _inherited_socket() -> socket.socket | None:
    """The listening socket a supervisor re-executed in spawn mode kept open."""
    fd = os.environ.pop(_LISTEN_FD_ENV, None)
    return socket.socket(fileno=int(fd)) if fd else None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
