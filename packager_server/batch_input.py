"""Reading a file to score in chunks of rows (see :mod:`packager_server.batch`), with
no more of the file in memory than the current chunk."""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

_READ_BLOCK = 1 << 20

Kind = Literal["csv", "jsonl", "parquet", "document"]


class BatchError(Exception):
    """The input cannot be scored; the message names the row when there is one."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``first_row`` … of the input, as the pieces of an ``/invocations`` body.

    ``records`` are the rows' raw bytes (CSV records, JSON lines, each ending in a
    newline) after ``header`` (a CSV's header line); a Parquet chunk is one Parquet file
    in ``header`` and no records; a JSON request document is ``header`` alone.
    """

    kind: Kind
    first_row: int
    header: bytes
    records: tuple[bytes, ...]
    rows: int


# -- chunks of rows --------------------------------------------------------------


def read_chunks(path: Path, content_type: str, chunk_rows: int) -> Iterator[Chunk]:
    """The input's rows, ``chunk_rows`` at a time, never more of the file in memory."""
    if content_type == "parquet":
        yield from _parquet_chunks(path, chunk_rows)
        return
    with path.open("rb") as f:
        if content_type == "csv":
            yield from _csv_chunks(f, chunk_rows)
        elif content_type == "jsonl":
            yield from _batched("jsonl", b"", _jsonl_records(f), chunk_rows)
        else:
            yield from _json_chunks(f, chunk_rows)


def _batched(kind: Kind, header: bytes, records: Iterator[bytes], size: int) -> Iterator[Chunk]:
    batch: list[bytes] = []
    first = 1
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield Chunk(kind, first, header, tuple(batch), len(batch))
            first += len(batch)
            batch = []
    if batch:
        yield Chunk(kind, first, header, tuple(batch), len(batch))


def _csv_records(f: IO[bytes]) -> Iterator[bytes]:
    """CSV records as raw bytes; a quoted field may hold line breaks (RFC 4180: a record
    ends at a line break outside quotes, i.e. after an even number of quotes)."""
    pending = b""
    for line in f:
        pending += line
        if pending.count(b'"') % 2:
            continue
        if pending.strip():
            yield pending if pending.endswith(b"\n") else pending + b"\n"
        pending = b""
    if pending.strip():
        raise BatchError("the file ends inside a quoted CSV field (an unbalanced '\"')")


def _csv_chunks(f: IO[bytes], chunk_rows: int) -> Iterator[Chunk]:
    records = _csv_records(f)
    header = next(records, None)
    if header is None:
        raise BatchError("the CSV file is empty: it needs a header line naming the columns")
    yield from _batched("csv", header, records, chunk_rows)


def _jsonl_records(f: IO[bytes]) -> Iterator[bytes]:
    for line in f:
        if line.strip():
            yield line if line.endswith(b"\n") else line + b"\n"


def _json_chunks(f: IO[bytes], chunk_rows: int) -> Iterator[Chunk]:
    """A JSON array of rows, element by element; or one MLflow request document."""
    start = f.read(_READ_BLOCK)
    stripped = start.lstrip()
    if stripped.startswith(b"{"):
        # MLflow's request format (what `mlflow models predict -t json` reads): one
        # request, scored whole like an /invocations body.
        yield Chunk("document", 1, start + f.read(), (), 0)
        return
    if not stripped.startswith(b"["):
        raise BatchError(
            "a json input is a JSON array of rows or an MLflow request object; "
            "for one row per line use --content-type jsonl"
        )
    yield from _batched("jsonl", b"", _json_array(start, f), chunk_rows)


def _json_array(start: bytes, f: IO[bytes]) -> Iterator[bytes]:
    """Each element of a top-level JSON array, as one JSON line (its own text, with the
    line breaks between tokens made spaces: JSON strings cannot hold raw ones)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text = utf8.decode(start.lstrip(), final=False)[1:]  # past the "["
    eof = False
    pos, row = 0, 0
    expect_value = True

    def more() -> bool:
        nonlocal text, pos, eof
        if eof:
            return False
        block = f.read(_READ_BLOCK)
        eof = not block
        text = text[pos:] + utf8.decode(block, final=eof)
        pos = 0
        return True

    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            if not more():
                raise BatchError(f"row {row + 1}: the JSON array is not closed")
            continue
        if text[pos] == "]" and (not expect_value or row == 0):
            return
        if not expect_value:
            if text[pos] != ",":
                raise BatchError(f"row {row}: expected ',' or ']' after it in the JSON array")
            pos += 1
            expect_value = True
            continue
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if more():  # the element may go on in the next block
                continue
            raise BatchError(f"row {row + 1}: not valid JSON ({err.msg})") from None
        if end == len(text) and not eof and more():  # a number may go on
            continue
        row += 1
        element = text[pos:end].replace("\r", " ").replace("\n", " ")
        yield element.encode() + b"\n"
        pos, expect_value = end, False


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]  # noqa: PLC0415
        import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:
        raise BatchError(
            "parquet input needs pyarrow, which this environment does not have: add "
            "pyarrow to the model's requirements (and rebuild), or convert the file to CSV "
            "or JSON lines"
        ) from None
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise BatchError(f"not a readable Parquet file: {err}") from None
    first = 1
    for batch in source.iter_batches(batch_size=chunk_rows):
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_batches([batch]), sink)
        yield Chunk("parquet", first, sink.getvalue(), (), batch.num_rows)
        first += batch.num_rows


def slice_chunk(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Rows ``start`` to ``stop`` (0-based, within the chunk) as a chunk of their own."""
    if chunk.kind == "parquet":
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        table = pq.read_table(pa.BufferReader(chunk.header)).slice(start, stop - start)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return Chunk("parquet", chunk.first_row + start, sink.getvalue(), (), stop - start)
    records = chunk.records[start:stop]
    return Chunk(chunk.kind, chunk.first_row + start, chunk.header, records, len(records))
