"""Reading a file to score in chunks of rows (see :mod:`packager_server.batch`), with
no more of the file in memory than the current chunk."""

from __future__ import annotations

import codecs
import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

_READ_BLOCK = 1 << 20
_MAX_RECORD = 64 << 20  # bytes of one CSV record or JSON array element
_COMMA = ord(",")
# A CSV line that ends outside quotes, given it starts a record: fields, each quoted ('"'
# at its start; '""' inside; the closing '"' never followed by another; then whatever
# comes up to the comma, '"' included) or unquoted (not starting with '"': anything but
# a comma, '"' included).
_FIELD = rb'(?:"[^"]*(?:""[^"]*)*"(?!")[^,\n]*|(?:[^,"\n][^,\n]*)?)'
_CLOSED_LINE = re.compile(rb"%s(?:,%s)*\n?" % (_FIELD, _FIELD))

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


def _batched(
    kind: Kind, header: bytes, blocks: Iterator[list[bytes]], size: int
) -> Iterator[Chunk]:
    """Chunks of ``size`` records from lists of records (a block of the file each)."""
    pending: list[bytes] = []
    first = 1
    for records in blocks:
        pending += records
        start = 0
        while len(pending) - start >= size:
            yield Chunk(kind, first, header, tuple(pending[start : start + size]), size)
            start += size
            first += size
        if start:  # keep the rest, copied once (deleting each chunk's records in turn
            # moved the block's remainder every time: quadratic for small chunks)
            pending = pending[start:]
    if pending:
        yield Chunk(kind, first, header, tuple(pending), len(pending))


def _line_blocks(f: IO[bytes]) -> Iterator[list[bytes]]:
    """The file's lines, each ending in a newline (the last one is given one), about
    ``_READ_BLOCK`` bytes of them at a time. ``readlines`` splits in C: a million lines
    cost the parent ~0.05 s, where a Python loop over them cost ~0.5 s of the CPU the
    workers need."""
    while lines := f.readlines(_READ_BLOCK):
        if not lines[-1].endswith(b"\n"):  # only the file's last line can lack it
            lines[-1] += b"\n"
        yield lines


def _non_blank(lines: list[bytes]) -> list[bytes]:
    """The lines that hold more than whitespace (blank lines are not rows)."""
    return lines if all(map(bytes.strip, lines)) else [line for line in lines if line.strip()]


def _csv_records(f: IO[bytes]) -> Iterator[list[bytes]]:
    """CSV records as raw bytes, a list per block of lines. A quoted field may hold line
    breaks: a record ends at a line break outside quotes. As in pandas' parser, a '"'
    opens a quoted field only at the start of a field; elsewhere it is a literal
    character (``1,5" pipe``). A block without any '"' (the common case) is taken whole:
    each of its lines is a record."""
    parts: list[bytes] = []  # the lines of a record inside a quoted field
    size = 0
    opened = 0  # the line the pending record starts on
    number = 0  # the last line read
    for lines in _line_blocks(f):
        if not parts and b'"' not in (lines[0] if len(lines) == 1 else b"".join(lines)):
            number += len(lines)
            yield _non_blank(lines)
            continue
        records: list[bytes] = []
        for line in lines:
            number += 1
            if not parts:
                if b'"' not in line:  # the line is the record
                    if line.strip():
                        records.append(line)
                    continue
                if _CLOSED_LINE.fullmatch(line):
                    records.append(line)
                    continue
                opened = number
            elif not _ends_in_quotes(line, in_quotes=True):
                parts.append(line)
                records.append(b"".join(parts))
                parts, size = [], 0
                continue
            parts.append(line)
            size += len(line)
            if size > _MAX_RECORD:
                raise BatchError(
                    f"line {opened}: a quoted CSV field opened there runs on for more than "
                    f"{_MAX_RECORD >> 20} MiB (an unbalanced '\"'?)"
                )
        yield records
    if parts:
        raise BatchError(
            f"the file ends inside a quoted CSV field (an unbalanced '\"'), opened on line {opened}"
        )


def _ends_in_quotes(line: bytes, *, in_quotes: bool) -> bool:
    """Whether ``line`` ends inside a quoted field (``in_quotes``: it starts in one)."""
    i = 0
    while True:
        if in_quotes:
            j = line.find(b'"', i)
            if j < 0:
                return True
            if line[j + 1 : j + 2] == b'"':  # an escaped quote
                i = j + 2
                continue
            in_quotes, i = False, j + 1
            continue
        j = line.find(b'"', i)
        if j < 0:
            return False
        # opens a quoted field at the start of one; literal anywhere else
        in_quotes, i = (j == 0 or line[j - 1] == _COMMA), j + 1


def _csv_chunks(f: IO[bytes], chunk_rows: int) -> Iterator[Chunk]:
    blocks = _csv_records(f)
    for records in blocks:
        if records:  # the first record is the header
            rest = itertools.chain([records[1:]], blocks)
            yield from _batched("csv", records[0], rest, chunk_rows)
            return
    raise BatchError("the CSV file is empty: it needs a header line naming the columns")


def _jsonl_records(f: IO[bytes]) -> Iterator[list[bytes]]:
    for lines in _line_blocks(f):
        yield _non_blank(lines)


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
    elements = ([element] for element in _json_array(start, f))
    yield from _batched("jsonl", b"", elements, chunk_rows)


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
        """Read on, for an element cut by the end of the buffer."""
        nonlocal text, pos, eof
        if eof:
            return False
        if len(text) - pos > _MAX_RECORD:
            raise BatchError(
                f"row {row + 1}: an element of the JSON array longer than "
                f"{_MAX_RECORD >> 20} MiB (or one that is not valid JSON)"
            )
        # as much again as is pending: a long element is decoded a few times, not once a block
        block = f.read(max(_READ_BLOCK, len(text) - pos))
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
            if _cut(err, len(text)) and more():  # the element may go on in the next block
                continue
            raise BatchError(f"row {row + 1}: not valid JSON ({err.msg})") from None
        if end >= len(text) - _TOKEN and not eof and more():  # a number may go on
            continue
        row += 1
        element = text[pos:end].replace("\r", " ").replace("\n", " ")
        yield element.encode() + b"\n"
        pos, expect_value = end, False


# longer than any token a cut can leave the decoder failing before (``-Infinity``, a
# surrogate pair's two ``\\uXXXX``, a number's ``1.5e+``)
_TOKEN = 16


def _cut(err: json.JSONDecodeError, length: int) -> bool:
    """Whether the decode error may be the end of the buffer cutting the element short:
    an error within a token of the end, or a string not closed before it. Any other
    error is in the element itself: reading on would not mend it."""
    return err.pos >= length - _TOKEN or err.msg.startswith("Unterminated string")


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
