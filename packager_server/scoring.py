"""``/invocations``: MLflow's scoring semantics, answered in JSON that never leaks data.

Status codes and predictions are MLflow's own: the exact path calls MLflow's
``scoring_server.invocations``; the fast path (:mod:`packager_server.fastpath`) gives the
same answers for the requests it accepts. What we change, without breaking clients:

* every error is JSON with at least ``error_code`` and ``message`` (MLflow answers 415 in
  plain text); MLflow's other fields (``error_class``, ``sqlstate``) are kept;
* messages never echo the request's data and answers carry no ``stack_trace`` (MLflow puts
  both in its 400 answers) unless the server runs with ``--debug``, which restores both;
* JSON nested too deeply or with over-long integers is a 400, not a 500.
"""

from __future__ import annotations

import json
import logging
import re
import time
import types
from dataclasses import dataclass, replace
from typing import IO, Any

from packager_server.fastpath import FastPath

log = logging.getLogger(__name__)

JSON = "application/json"
# A quoted value: the quote opens after a non-word character and closes before one, so an
# apostrophe ("the model's input") neither opens a quote nor swallows the next one.
_QUOTED = re.compile(r"(?<!\w)'([^']{3,}?)'(?!\w)|(?<!\w)\"([^\"]{3,}?)\"(?!\w)")
_MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    route: str = "-"  # "fast" or "exact" for /invocations answers, for the access log
    content_type: str = JSON
    # Seconds spent scoring (parsing, schema, model, JSON), and in the model's own predict
    # when packager called it (the fast path): the Server-Timing header and the access log.
    score_seconds: float | None = None
    model_seconds: float | None = None


def error_answer(status: int, code: str, message: str) -> Answer:
    body = json.dumps({"error_code": code, "message": message}).encode()
    return Answer(status=status, body=body)


def _dump(obj: Any, fp: IO[str], **kwargs: Any) -> None:
    """``json.dump``, written as one ``json.dumps``: the same text (``dump`` writes what
    ``dumps`` returns, piece by piece), but through the C encoder, which CPython uses only
    for one-shot ``dumps``; ``dump`` runs the pure-Python one."""
    fp.write(json.dumps(obj, **kwargs))


def answer_json_in_c() -> None:
    """Give MLflow's scoring module a ``json`` whose ``dump`` is :func:`_dump`.

    MLflow writes every answer with ``json.dump({"predictions": …}, stream,
    cls=NumpyEncoder)``: 4.3 ms for 20,000 predictions where the same text from ``dumps``
    takes 0.9 ms, a fifth of batch scoring's time per row. The rest of ``json`` is left as
    it is; ``tests/server/test_scoring_json.py`` compares MLflow's answers with and without."""
    from mlflow.pyfunc import scoring_server  # noqa: PLC0415

    names = vars(scoring_server)  # its globals
    if isinstance(names.get("json"), types.ModuleType):
        names["json"] = types.SimpleNamespace(**{**vars(json), "dump": _dump})


class Scorer:
    """Answers ``/invocations`` bodies for one loaded model."""

    def __init__(self, model: Any, *, fast_path: bool = True, debug: bool = False) -> None:
        answer_json_in_c()
        self.model = model
        self.debug = debug
        self.input_schema = model.metadata.get_input_schema()
        self.fast = FastPath.build(model) if fast_path else None
        self._schema_words = self._words_from_schema()

    def invoke(self, body: bytes, content_type: str | None) -> Answer:
        if not content_type:
            return error_answer(
                415,
                "BAD_REQUEST",
                "missing Content-Type header: send "
                "application/json, text/csv or application/vnd.apache.parquet",
            )
        started = time.perf_counter()
        if self.fast is not None:
            request = self.fast.parse(body, content_type)
            if request is not None:
                try:
                    predictions, model_seconds = self.fast.predict(request)
                except Exception:
                    log.debug("fast path failed; answering through MLflow's path", exc_info=True)
                else:
                    return Answer(
                        status=200,
                        body=predictions,
                        route="fast",
                        score_seconds=time.perf_counter() - started,
                        model_seconds=model_seconds,
                    )
        answer = self._exact(body, content_type)
        return replace(answer, route="exact", score_seconds=time.perf_counter() - started)

    def _exact(self, body: bytes, content_type: str) -> Answer:
        from mlflow.exceptions import MlflowException  # noqa: PLC0415
        from mlflow.pyfunc.scoring_server import invocations  # noqa: PLC0415

        try:
            result = invocations(  # type: ignore[no-untyped-call]
                body, content_type, self.model, self.input_schema
            )
        except MlflowException as err:
            return self._mlflow_error(err, body)
        except RecursionError:
            return error_answer(400, "BAD_REQUEST", "the JSON body is nested too deeply")
        except ValueError as err:  # e.g. int() digit limits while decoding JSON
            return error_answer(
                400,
                "BAD_REQUEST",
                f"the body could not be decoded: {self._message(str(err), body)}",
            )
        except Exception:
            log.exception("unexpected error while scoring")
            return error_answer(
                500,
                "INTERNAL_ERROR",
                "internal error while scoring; see the server log for the traceback",
            )
        if result.mimetype != JSON:  # MLflow's plain-text 415 answers
            return error_answer(result.status, "BAD_REQUEST", result.response[:_MAX_MESSAGE])
        return Answer(status=result.status, body=result.response.encode())

    def _mlflow_error(self, err: Any, body: bytes) -> Answer:
        """MLflow's error body, field for field (``error_code``, ``message``,
        ``error_class``, ``sqlstate`` and whatever else it adds), with the message cleaned
        of request data and ``stack_trace`` kept only with ``--debug``, as MLflow's own
        server sends it."""
        status: int = err.get_http_status_code()
        fields: dict[str, Any] = json.loads(err.serialize_as_json())
        fields["error_code"] = str(fields.get("error_code", err.error_code))
        fields["message"] = self._message(err.message, body)
        if not self.debug:
            fields.pop("stack_trace", None)
        return Answer(status=status, body=json.dumps(fields).encode())

    # -- messages ---------------------------------------------------------------------

    def _message(self, message: str, body: bytes) -> str:
        """MLflow's message without the request data it embeds (unless debugging)."""
        if self.debug:
            return message[: _MAX_MESSAGE * 10]
        text = message.split("\nInput:", 1)[0]  # JSON decode errors append the whole body
        if "Failed to enforce schema" in text or text.startswith("Failed to predict data"):
            reason = text.rsplit("Error: ", 1)[-1].strip()
            prefix = (
                "Failed to enforce the model's input schema: "
                if "Failed to enforce schema" in text
                else "Failed to predict: "
            )
            text = prefix + reason
        if self._echoes(text, body):
            text = (
                text.split(":", 1)[0] + ": details withheld because they contain request "
                "data (start the server with --debug to see them)"
            )
        return text[:_MAX_MESSAGE]

    def _echoes(self, text: str, body: bytes) -> bool:
        """True when a quoted value in ``text`` comes from the request body."""
        raw = body.decode("utf-8", "replace")
        for match in _QUOTED.finditer(text):
            value = match.group(1) or match.group(2)
            if value in raw and value not in self._schema_words:
                return True
        return False

    def _words_from_schema(self) -> frozenset[str]:
        """Column names and types: quoting these is not echoing data."""
        if self.input_schema is None:
            return frozenset()
        words: set[str] = set()
        for spec in self.input_schema.inputs:
            if getattr(spec, "name", None):
                words.add(str(spec.name))
            words.add(str(getattr(getattr(spec, "type", None), "name", "")))
        return frozenset(words)
