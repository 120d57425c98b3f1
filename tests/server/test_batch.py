"""Batch scoring (packager_server.batch): chunking, row numbers, atomic output; then the
real command on a real model."""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager_server import batch, batch_input
from packager_server.batch import atomic_output, score_chunk
from packager_server.batch_input import BatchError, Chunk, read_chunks
from packager_server.scoring import Answer, error_answer
from tests.server.conftest import wait_until


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


# -- chunking -------------------------------------------------------------------------------


def test_csv_chunks_keep_the_header_and_count_rows_across_quoted_line_breaks(
    tmp_path: Path,
) -> None:
    source = _write(tmp_path / "in.csv", 'a,b\n1,"x\ny"\n2,"say ""hi"""\n\n3,z\n4,w')
    chunks = list(read_chunks(source, "csv", 2))
    assert [(c.first_row, c.rows) for c in chunks] == [(1, 2), (3, 2)]
    assert all(c.header == b"a,b\n" for c in chunks)
    assert chunks[0].records == (b'1,"x\ny"\n', b'2,"say ""hi"""\n')
    assert chunks[1].records == (b"3,z\n", b"4,w\n")  # the last line gets its line break


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_csv_records_are_the_same_whatever_blocks_the_file_is_read_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Blocks without a quote are taken whole, the others line by line: a quoted field
    that spans blocks, blank and whitespace-only lines, and a last line without its line
    break come out the same for any block size."""
    monkeypatch.setattr(batch_input, "_READ_BLOCK", block)
    plain = "".join(f"{i},{i * 2}\n" for i in range(40))
    text = f'a,b\n{plain}1,"x\n\n{plain}y"\n\n   \n\t\r\n{plain}2,"q ""z"""\n{plain}3,end'
    source = _write(tmp_path / "in.csv", text)
    chunks = list(read_chunks(source, "csv", 25))
    records = [r for c in chunks for r in c.records]
    rows = [f"{i},{i * 2}\n".encode() for i in range(40)]
    assert records == [
        *rows,
        b'1,"x\n\n' + b"".join(rows) + b'y"\n',
        *rows,
        b'2,"q ""z"""\n',
        *rows,
        b"3,end\n",
    ]
    assert [c.first_row for c in chunks] == list(range(1, len(records) + 1, 25))
    assert all(c.rows == len(c.records) <= 25 for c in chunks)
    assert {c.header for c in chunks} == {b"a,b\n"}


def test_a_csv_file_ending_inside_quotes_is_an_error(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.csv", 'a\n"open\n')
    with pytest.raises(BatchError, match="ends inside a quoted CSV field"):
        list(read_chunks(source, "csv", 10))


def test_a_quote_inside_an_unquoted_csv_field_is_a_literal_character(tmp_path: Path) -> None:
    """As in pandas' parser: a '"' opens a quoted field only at the start of a field."""
    import pandas as pd

    text = 'a,b\n1,5" pipe\n2,x\n3,"y\nz ""q"""\n4,"w"x"\n"5",v\n'
    source = _write(tmp_path / "in.csv", text)
    (chunk,) = read_chunks(source, "csv", 10)
    assert chunk.records == (
        b'1,5" pipe\n',
        b"2,x\n",
        b'3,"y\nz ""q"""\n',
        b'4,"w"x"\n',
        b'"5",v\n',
    )
    frame = pd.read_csv(io.BytesIO(chunk.header + b"".join(chunk.records)))
    assert len(frame) == chunk.rows == 5
    assert frame["b"].tolist() == ['5" pipe', "x", 'y\nz "q"', 'wx"', "v"]


def test_a_csv_field_that_never_closes_is_an_error_naming_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_input, "_MAX_RECORD", 1000, raising=False)
    source = _write(tmp_path / "in.csv", 'a\n1\n"open\n' + "2\n" * 10_000)
    with pytest.raises(BatchError, match=r"^line 3: a quoted CSV field opened there runs on"):
        list(read_chunks(source, "csv", 10))


def test_json_lines_skip_blank_lines(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.jsonl", '{"x": 1}\n\n  \n{"x": 2}\n{"x": 3}')
    chunks = list(read_chunks(source, "jsonl", 2))
    assert [(c.first_row, c.records) for c in chunks] == [
        (1, (b'{"x": 1}\n', b'{"x": 2}\n')),
        (3, (b'{"x": 3}\n',)),
    ]


def test_a_json_array_is_streamed_element_by_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_input, "_READ_BLOCK", 5)  # elements and numbers cut across blocks
    rows: list[Any] = [
        {"x": 1.25, "s": "a, \u00e9 ]"},
        [1, 2],
        {"x": 123456789},
        {"nested": {"a": [1]}},
    ]
    source = _write(tmp_path / "in.json", json.dumps(rows, indent=2))
    chunks = list(read_chunks(source, "json", 3))
    assert [c.first_row for c in chunks] == [1, 4]
    decoded = [json.loads(r) for c in chunks for r in c.records]
    assert decoded == rows
    assert all(r.count(b"\n") == 1 for c in chunks for r in c.records)  # one line each


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[{"x": 1}, {"x": ]', "row 2: not valid JSON"),
        ('[{"x": 1} {"x": 2}]', "row 1: expected ','"),
        ('[{"x": 1},', "row 2: the JSON array is not closed"),
        ('"text"', "a JSON array of rows or an MLflow request object"),
    ],
)
def test_a_broken_json_array_names_the_row(tmp_path: Path, text: str, error: str) -> None:
    source = _write(tmp_path / "in.json", text)
    with pytest.raises(BatchError, match=error):
        list(read_chunks(source, "json", 10))


def _json_elements(data: bytes) -> tuple[list[bytes], io.BytesIO]:
    f = io.BytesIO(data)
    elements = list(batch_input._json_array(f.read(batch_input._READ_BLOCK), f))
    return elements, f


def test_a_malformed_json_element_is_reported_without_reading_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_input, "_READ_BLOCK", 1024)
    data = b'[{"x": 1}, {"x": tru e}, ' + b'{"x": 1}, ' * 50_000 + b'{"x": 1}]'
    with pytest.raises(BatchError, match="row 2: not valid JSON") as caught:
        _json_elements(data)
    f = caught.traceback[-1].frame.f_locals["f"]
    assert f.tell() <= 4 * 1024  # not the rest of the file


def test_a_json_element_over_the_cap_is_an_error_naming_its_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_input, "_READ_BLOCK", 1024)
    monkeypatch.setattr(batch_input, "_MAX_RECORD", 4096, raising=False)
    data = b'[{"x": 1}, "' + b"a" * 100_000 + b'"]'
    with pytest.raises(BatchError, match="row 2: an element of the JSON array longer than"):
        _json_elements(data)


@pytest.mark.parametrize("block", range(1, 12))
def test_json_numbers_cut_by_a_block_are_read_whole(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(batch_input, "_READ_BLOCK", block)
    rows = [1.5, -2.25e-05, 123456.75, "x", 7]
    elements, _ = _json_elements(json.dumps(rows).encode())
    assert [json.loads(e) for e in elements] == rows


def test_a_json_request_document_is_one_chunk(tmp_path: Path) -> None:
    document = '{"dataframe_split": {"columns": ["x"], "data": [[1], [2]]}}'
    source = _write(tmp_path / "in.json", document)
    assert list(read_chunks(source, "json", 1)) == [Chunk("document", 1, document.encode(), (), 0)]


def test_parquet_chunks(tmp_path: Path) -> None:
    import pandas as pd

    source = tmp_path / "in.parquet"
    pd.DataFrame({"x": [float(i) for i in range(5)]}).to_parquet(source)
    chunks = list(read_chunks(source, "parquet", 2))
    assert [(c.first_row, c.rows) for c in chunks] == [(1, 2), (3, 2), (5, 1)]
    middle = pd.read_parquet(__import__("io").BytesIO(chunks[1].header))
    assert middle["x"].tolist() == [2.0, 3.0]


# -- row numbers in errors ---------------------------------------------------------------------


class FakeScorer:
    """Doubles column x of CSV bodies; a row whose x is not a number fails the request,
    as MLflow's schema enforcement would."""

    input_schema = None

    def __init__(self) -> None:
        self.calls = 0

    def invoke(self, body: bytes, content_type: str | None) -> Answer:
        self.calls += 1
        assert content_type == "text/csv"
        values = body.decode().splitlines()[1:]
        try:
            predictions = [2 * float(v) for v in values]
        except ValueError:
            return error_answer(400, "BAD_REQUEST", "Failed to enforce the model's input schema")
        return Answer(status=200, body=json.dumps({"predictions": predictions}).encode())


def _csv_chunk(first_row: int, values: list[str]) -> Chunk:
    records = tuple(f"{v}\n".encode() for v in values)
    return Chunk("csv", first_row, b"x\n", records, len(records))


def test_a_failing_chunk_is_bisected_to_the_first_failing_row() -> None:
    values = [str(i) for i in range(1000)]
    values[233] = values[700] = "oops"
    scorer = FakeScorer()
    with pytest.raises(BatchError) as caught:
        score_chunk(scorer, _csv_chunk(1001, values))  # type: ignore[arg-type]
    assert str(caught.value) == "row 1234: Failed to enforce the model's input schema"
    assert scorer.calls <= 1 + 2 * 10  # bisection, not one call per row


def test_a_chunk_that_scores_gives_one_prediction_per_row() -> None:
    predictions = score_chunk(FakeScorer(), _csv_chunk(1, ["1", "2.5"]))  # type: ignore[arg-type]
    assert predictions == [2.0, 5.0]


def test_output_formats() -> None:
    assert batch.formatted([1, 2.5], "jsonl") == (b"", b"1\n2.5\n")
    assert batch.formatted([True, "a", None, float("nan")], "jsonl")[1] == b'true\n"a"\nnull\nNaN\n'
    assert batch.formatted([1, 2.5], "csv") == (b"prediction\n", b"1\n2.5\n")
    header, rows = batch.formatted([{"label": "a,b", "p": 0.5}, {"label": "c", "p": 1}], "csv")
    assert (header, rows) == (b"label,p\n", b'"a,b",0.5\nc,1\n')
    assert batch.formatted([[1, 2], [3, 4]], "csv") == (b"0,1\n", b"1,2\n3,4\n")


# -- atomic output ---------------------------------------------------------------------------


def test_output_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with atomic_output(target) as out:
        out.write(b"partial")
        assert not target.exists()
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file, beside it
    assert target.read_bytes() == b"partial"
    assert list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o644 == 0o644  # not mkstemp's 0600


def test_nothing_is_left_on_failure_and_an_old_output_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_bytes(b"previous run")

    def fail() -> None:
        with atomic_output(target) as out:
            out.write(b"half")
            raise BatchError("row 7: boom")

    with pytest.raises(BatchError):
        fail()
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"previous run"


# -- stop signals ------------------------------------------------------------------------------


@pytest.fixture
def stop_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """batch's SIGTERM/SIGINT handler installed, as by ``run``; the previous ones after."""
    monkeypatch.setattr(batch, "_signalled", 0, raising=False)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, batch._stop)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _signal_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.usefixtures("stop_handler")
def test_sigterm_is_heeded_between_chunks_not_wherever_it_lands() -> None:
    _signal_self()
    for _ in range(100):  # bytecode boundaries, where a raising handler would strike
        pass
    with pytest.raises(batch._Stopped):
        batch._check_stop()


@pytest.mark.usefixtures("stop_handler")
def test_sigterm_during_cleanup_still_removes_the_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unlink = Path.unlink

    def signalled_unlink(self: Path, missing_ok: bool = False) -> None:
        _signal_self()
        unlink(self, missing_ok=missing_ok)

    def fail() -> None:
        with atomic_output(tmp_path / "out.csv") as out:
            out.write(b"half")
            raise BatchError("row 7: boom")

    monkeypatch.setattr(Path, "unlink", signalled_unlink)
    with pytest.raises(BatchError):
        fail()
    assert list(tmp_path.iterdir()) == []
    assert batch._signalled == signal.SIGTERM  # noted, for the next check


def _fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() with FakeScorer in place of a loaded model."""
    from packager_server import scoring, supervisor

    monkeypatch.setattr(supervisor, "_import_mlflow", lambda: None)
    monkeypatch.setattr(supervisor, "load_model", lambda _config: (None, {}))
    monkeypatch.setattr(supervisor, "_warm_up", lambda _scorer, _model_dir: None)
    monkeypatch.setattr(scoring, "Scorer", lambda _model, **_options: FakeScorer())


@pytest.mark.usefixtures("stop_handler")
def test_sigterm_after_the_rename_reports_the_complete_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_model(monkeypatch)
    replace = Path.replace

    def signalled_replace(self: Path, target: Path) -> Path:
        done = replace(self, target)
        _signal_self()
        return done

    monkeypatch.setattr(Path, "replace", signalled_replace)
    source = _write(tmp_path / "in.csv", "x\n1\n2\n3\n")
    out = tmp_path / "out.csv"
    config = batch.PredictConfig(
        model_dir=tmp_path, input=source, output=out, content_type="csv", workers=1, chunk_rows=2
    )
    with caplog.at_level("INFO", logger="packager_server.predict"):
        code = batch.run(config)
    assert out.read_text() == "prediction\n2.0\n4.0\n6.0\n"
    assert code == 0
    assert "nothing was written" not in caplog.text
    assert "SIGTERM came after every row was scored: the output is complete" in caplog.text


def _workers_forked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pids: list[int] = []
    fork = os.fork

    def recorded_fork() -> int:
        pid = fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recorded_fork)
    return pids


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.usefixtures("stop_handler")
def test_sigterm_while_the_workers_are_reaped_still_kills_and_reaps_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pids = _workers_forked(monkeypatch)
    waitpid = os.waitpid

    def signalled_waitpid(pid: int, options: int) -> tuple[int, int]:
        _signal_self()
        return waitpid(pid, options)

    chunks = iter([_csv_chunk(1 + 2 * i, ["1", "2"]) for i in range(6)])
    scored = batch._forked(FakeScorer(), chunks, 2, "csv")  # type: ignore[arg-type]
    try:
        assert next(scored)[1] == b"2.0\n4.0\n"
        monkeypatch.setattr(os, "waitpid", signalled_waitpid)
        scored.close()  # stopped early: the other worker's chunk is not wanted
        monkeypatch.setattr(os, "waitpid", waitpid)
        assert len(pids) == 2
        assert all(_reaped(pid) for pid in pids)
    finally:
        gc.unfreeze()


class SlowScorer(FakeScorer):
    """Leaves ``marker`` when a minute's scoring was not cut short."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def invoke(self, body: bytes, content_type: str | None) -> Answer:
        time.sleep(60)
        self.marker.touch()
        return super().invoke(body, content_type)


@pytest.mark.usefixtures("stop_handler")
def test_sigterm_while_waiting_for_a_worker_stops_and_kills_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pids = _workers_forked(monkeypatch)
    marker = tmp_path / "scored"
    chunks = iter([_csv_chunk(1, ["1"])])  # the last chunk in flight: none pending
    scored = batch._forked(SlowScorer(marker), chunks, 1, "csv")  # type: ignore[arg-type]
    timer = threading.Timer(0.3, _signal_self)
    timer.start()
    try:
        with pytest.raises(batch._Stopped):
            next(scored)
        assert len(pids) == 1
        assert _reaped(pids[0])
        assert not marker.exists()  # killed mid-chunk, not waited for
    finally:
        timer.cancel()
        gc.unfreeze()


# -- the command, on a real model --------------------------------------------------------------


def _predict(model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "packager_server", "predict", "--model-dir", str(model), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_predict_scores_in_forked_workers_in_order(server_models: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("x\n" + "".join(f"{i}.5\n" for i in range(1000)))
    out = tmp_path / "out.csv"
    result = _predict(
        server_models / "sleepy",
        "-i",
        str(source),
        "-o",
        str(out),
        "--workers",
        "2",
        "--chunk-rows",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert "2 worker processes forked" in result.stderr
    assert "1000 rows scored" in result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction"
    assert [float(v) for v in lines[1:]] == [2 * (i + 0.5) for i in range(1000)]


def test_predict_names_the_failing_row_and_writes_nothing(
    server_models: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    rows: list[dict[str, Any]] = [{"x": float(i)} for i in range(300)]
    rows[122] = {"x": "not a number"}
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    result = _predict(
        server_models / "sleepy",
        "-i",
        str(source),
        "-o",
        str(out),
        "--workers",
        "2",
        "--chunk-rows",
        "50",
    )
    assert result.returncode == batch.EXIT_FAILED
    assert "row 123: " in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_predict_refuses_an_input_it_cannot_read(server_models: Path, tmp_path: Path) -> None:
    result = _predict(
        server_models / "sleepy", "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o")
    )
    assert result.returncode == batch.EXIT_CONFIG
    assert "pass --content-type (csv, json, jsonl, parquet)" in result.stderr


def test_predict_scores_in_one_process_when_a_fork_would_hang(
    server_models: Path, tmp_path: Path
) -> None:
    """The server's serving-mode decision: the pooled model's forked probe hangs."""
    source = tmp_path / "in.csv"
    source.write_text("x\n1\n2\n3\n")
    out = tmp_path / "out.csv"
    result = _predict(server_models / "pooled", "-i", str(source), "-o", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "one process: loading left" in result.stderr
    assert out.read_text() == "prediction\n2.0\n3.0\n4.0\n"


def _long_run(server_models: Path, tmp_path: Path) -> list[str]:
    """A predict command that takes minutes (a million rows in chunks of 50) into out.csv."""
    source = tmp_path / "in.csv"
    source.write_text("x\n" + "1.5\n" * 1_000_000)
    command = [sys.executable, "-m", "packager_server", "predict", "--model-dir"]
    command += [str(server_models / "sleepy"), "-i", str(source), "-o", str(tmp_path / "out.csv")]
    return [*command, "--workers", "2", "--chunk-rows", "50"]


def test_sigterm_mid_run_stops_the_workers_and_leaves_nothing(
    server_models: Path, tmp_path: Path
) -> None:
    command = _long_run(server_models, tmp_path)
    with (tmp_path / "err").open("w+") as err:
        process = subprocess.Popen(command, stderr=err, text=True)
        try:
            wait_until(lambda: list(tmp_path.glob(".out.csv.*.partial")), 120, "the output")
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
    assert code == 128 + signal.SIGTERM
    assert "stopped (SIGTERM) after" in (tmp_path / "err").read_text()
    assert "nothing was written" in (tmp_path / "err").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "in.csv"]


def test_output_to_a_fifo_or_device_is_written_in_place(tmp_path: Path) -> None:
    """Renaming a temporary file over /dev/null (as root) turns it into a regular file for
    the whole machine; a FIFO stands in for the device here."""
    import os
    import threading

    from packager_server.batch import atomic_output

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_output(fifo) as out:
        out.write(b"1\n2\n")
    reader.join(timeout=10)
    assert received == [b"1\n2\n"]
    assert fifo.is_fifo()
    assert [p.name for p in tmp_path.iterdir()] == ["out.fifo"]  # no .partial beside it


@pytest.mark.parametrize("first_process", [False, True], ids=["host", "pid-1"])
def test_sigterm_while_loading_stops_at_once(
    server_models: Path, tmp_path: Path, first_process: bool
) -> None:
    """Nothing is written yet. On the host the signal's default action ends the process
    at once (even inside a load's C code); as a PID namespace's first process, as in
    ``docker run IMAGE predict``, the kernel would drop that, so a handler exits with
    128 + the signal and says so."""
    source = tmp_path / "in.csv"
    source.write_text("x\n1.5\n")
    command = [sys.executable, "-m", "packager_server", "predict", "--model-dir"]
    command += [str(server_models / "sleepy"), "-i", str(source), "-o", str(tmp_path / "o.csv")]
    if first_process:
        command = ["unshare", "--pid", "--fork", "--kill-child", *command]
    loading = tmp_path / "loading.pid"
    env = {**os.environ, "SLEEPY_LOAD_SECONDS": "120", "SLEEPY_LOAD_PIDFILE": str(loading)}
    with (tmp_path / "err").open("w+") as err:
        process = subprocess.Popen(command, stderr=err, env=env)
        try:
            wait_until(lambda: loading.is_file() and loading.read_text(), 120, "the load")
            predict = process.pid
            if first_process:  # unshare's child: pid 1 inside, this pid outside
                assert loading.read_text() == "1"
                (predict,) = map(
                    int,
                    Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split(),
                )
            os.kill(predict, signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = (tmp_path / "err").read_text()
    if first_process:
        assert code == 128 + signal.SIGTERM, log
        assert "stopped (SIGTERM) while loading the model; nothing was written" in log, log
    else:
        assert code == -signal.SIGTERM, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "in.csv", "loading.pid"]


def test_a_ctrl_c_to_the_whole_group_mid_run_is_a_stop_not_a_dead_worker(
    server_models: Path, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C (or a service manager) signals every process of the group: the
    workers leave the stop to the parent, which reports it and removes the output."""
    command = _long_run(server_models, tmp_path)
    with (tmp_path / "err").open("w+") as err:
        process = subprocess.Popen(command, stderr=err, start_new_session=True)
        try:
            wait_until(lambda: list(tmp_path.glob(".out.csv.*.partial")), 120, "the output")
        finally:
            os.killpg(process.pid, signal.SIGINT)
            code = process.wait(timeout=60)
    log = (tmp_path / "err").read_text()
    assert code == 128 + signal.SIGINT, log
    assert "stopped (SIGINT) after" in log, log
    assert "died" not in log, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "in.csv"]
