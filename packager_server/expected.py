"""What MLflow's own scoring path answers for a request, computed locally.

    python -m packager_server.expected MODEL_DIR CONTENT_TYPE REQUEST.json...

Prints a JSON list of ``{"status": ..., "body": ...}``, one per request. ``packager test``
runs this in a second container of the image under test (the model's own environment)
and compares the serving container's answers with it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import mlflow.pyfunc  # noqa: PLC0415 - after argv is read: startup cost only when run

    from packager_server.scoring import Scorer  # noqa: PLC0415

    model_dir, content_type, requests = Path(argv[0]), argv[1], [Path(a) for a in argv[2:]]
    # Only the answers go to stdout: whatever the model writes there while loading or
    # predicting (Keras' predict prints a progress bar, native code may print) goes to
    # stderr, at the file descriptor, so that C-level writes follow too.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    scorer = Scorer(mlflow.pyfunc.load_model(str(model_dir)), fast_path=False)
    answers = []
    for request in requests:
        answer = scorer.invoke(request.read_bytes(), content_type)
        answers.append({"status": answer.status, "body": json.loads(answer.body)})
    out.write(json.dumps(answers))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
