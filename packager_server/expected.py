"""What MLflow's own scoring path answers for a request, computed locally.

    python -m packager_server.expected MODEL_DIR REQUEST.json [CONTENT_TYPE]

Prints ``{"status": ..., "body": ...}``. ``packager test`` runs this in an environment
that has the model's requirements, and compares the container's answers with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import mlflow.pyfunc  # noqa: PLC0415 - after argv is read: startup cost only when run

    from packager_server.scoring import Scorer  # noqa: PLC0415

    model_dir, request = Path(argv[0]), Path(argv[1])
    content_type = argv[2] if len(argv) > 2 else "application/json"
    scorer = Scorer(mlflow.pyfunc.load_model(str(model_dir)), fast_path=False)
    answer = scorer.invoke(request.read_bytes(), content_type)
    sys.stdout.write(json.dumps({"status": answer.status, "body": json.loads(answer.body)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
