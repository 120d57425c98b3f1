"""Train the example model and register it in an embedded SQLite MLflow registry.

No tracking server is needed: MLflow writes the registry to ``<dir>/mlflow.db`` and the
artifacts to ``<dir>/artifacts``. The model is the one the benchmarks use: a decision tree
on the wine data (13 double columns), wrapped in a PythonModel, registered as
``wine-classifier`` with the alias ``@champion``. A second run reuses the version the
alias points to; ``--new-version`` registers one more (a new run, same requirements).

    python examples/register_example.py --dir .packager-demo
    export MLFLOW_TRACKING_URI=sqlite:///.packager-demo/mlflow.db
    packager inspect models:/wine-classifier@champion
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_wine
from sklearn.tree import DecisionTreeClassifier

MODEL_NAME = "wine-classifier"


class WineClassifier(PythonModel):
    """Loads the tree from its artifact and predicts the wine class of each row."""

    def load_context(self, context: Any) -> None:
        with Path(context.artifacts["tree"]).open("rb") as handle:
            self.tree = pickle.load(handle)  # noqa: S301 - our own artifact

    def predict(
        self,
        context: Any,  # noqa: ARG002 - MLflow's signature
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,  # noqa: ARG002 - MLflow's signature
    ) -> list[int]:
        return [int(v) for v in self.tree.predict(model_input)]


def register(directory: Path, *, new_version: bool = False) -> dict[str, str]:
    _quiet_mlflow()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    if not new_version:
        existing = _champion()
        if existing is not None:
            return _refs(tracking_uri, existing)
    experiment = "packager-example"
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(directory / "artifacts").as_uri())
    mlflow.set_experiment(experiment)

    data = load_wine(as_frame=True)
    features = data.data.astype("float64")
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(features, data.target)
    example = features.iloc[:2]
    with tempfile.TemporaryDirectory() as tmp:
        tree_path = Path(tmp) / "tree.pkl"
        tree_path.write_bytes(pickle.dumps(tree))
        signature = infer_signature(example, [int(v) for v in tree.predict(example)])
        with mlflow.start_run(run_name="wine-classifier"):
            mlflow.log_params({"max_depth": 4, "random_state": 0})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=WineClassifier(),
                artifacts={"tree": str(tree_path)},
                signature=signature,
                input_example=example,
                registered_model_name=MODEL_NAME,
                pip_requirements=[f"scikit-learn=={_version('sklearn')}", "pandas"],
            )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    client.update_model_version(MODEL_NAME, version, description="wine classifier example")
    return _refs(tracking_uri, version)


def _champion() -> str | None:
    """The version @champion points to, if the example was registered before."""
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion").version)
    except MlflowException:
        return None


def _refs(tracking_uri: str, version: str) -> dict[str, str]:
    return {
        "tracking_uri": tracking_uri,
        "model": f"models:/{MODEL_NAME}/{version}",
        "alias": f"models:/{MODEL_NAME}@champion",
    }


def _quiet_mlflow() -> None:
    """MLflow's advice for models in general, which this example already follows or which
    does not apply (its integer output column has no missing values; the PythonModel is
    our own code), and its database set-up lines: noise in the demo's output."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")


def _version(module: str) -> str:
    return str(__import__(module).__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".packager-demo"),
        help="where the SQLite registry and artifacts go",
    )
    parser.add_argument(
        "--new-version",
        action="store_true",
        help="register one more version even if the example is already registered",
    )
    args = parser.parse_args()
    print(json.dumps(register(args.dir, new_version=args.new_version)))


if __name__ == "__main__":
    main()
