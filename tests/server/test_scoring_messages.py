"""Error messages withhold quoted request data, however the message around it is quoted."""

from __future__ import annotations

import pytest

from packager_server.scoring import Scorer


class _Words:
    _schema_words = frozenset({"text", "string"})


@pytest.mark.parametrize(
    ("message", "echoes"),
    [
        # The apostrophe in "model's" must not pair with the quote that opens the value.
        (
            (
                "Failed to enforce the model's input schema: could not convert string to "
                "float: 'not a number'"
            ),
            True,
        ),
        ('Incompatible input types for column "text". Can not safely convert "payload-42"', True),
        ("the model's input has a column named 'text' of type 'string'", False),
        ("it's the model's own failure, nothing quoted", False),
    ],
)
def test_quoted_request_data_is_found(message: str, echoes: bool) -> None:
    body = b'{"dataframe_split": {"columns": ["text"], "data": [["not a number"], ["payload-42"]]}}'
    assert Scorer._echoes(_Words(), message, body) is echoes  # type: ignore[arg-type]
