"""MLflow's standard face of an hvd model: `mlflow.pyfunc.load_model(uri).predict(captions)` ranks the gallery
index linked to the model's registry version, as `pipelines/search.py` does.

Every model `hvd.registry.flavor` saves names this module as its pyfunc `loader_module`: MLflow imports it and
calls `_load_pyfunc` on its download of the model's folder. Nothing is unpickled; the weights are read by the
hvd flavor's own loader, with its sha256 checks, and the search is `Retriever.search`'s.

    import mlflow
    ranked = mlflow.pyfunc.load_model("models:/hvd@champion").predict(["a red circle rises"], params={"top": 5})
    # one row per caption and rank: caption, rank, video_id, score, stage1_score

The settings in `flavor.PYFUNC_CONFIG` (which linked index, where it is downloaded) take other values with
`mlflow.pyfunc.load_model(uri, model_config={"eval.benchmark": "msrvtt", "index.cache": "/tmp/indexes"})`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient

from hvd.config import Config, load_config
from hvd.registry.flavor import PYFUNC_TOP, SIGNATURE, load_local_model
from hvd.registry.index_links import linked_indexes
from hvd.registry.sources import ModelSource
from hvd.search.retriever import Retriever

COLUMNS = SIGNATURE.outputs.input_names()  # caption, rank, video_id, score, stage1_score


class CaptionRanker:
    """What the pyfunc predicts with: captions in, each caption's best videos of the gallery out."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever

    def predict(
        self, model_input: str | list[str] | pd.Series | pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Each caption's `top` (param, default `PYFUNC_TOP`) best videos, one row per caption and rank, ranked
        by `Retriever.search`."""
        top = int((params or {}).get("top", PYFUNC_TOP))
        if top < 1:
            raise ValueError(f"top={top}: must be at least 1")
        captions = captions_of(model_input)
        found = self.retriever.search(captions, top) if captions else []
        rows = [(caption, hit.rank, hit.video_id, hit.score, hit.stage1_score)
                for caption, hits in zip(captions, found, strict=True) for hit in hits]
        return pd.DataFrame(rows, columns=COLUMNS)


def captions_of(model_input: str | list[str] | pd.Series | pd.DataFrame) -> list[str]:
    """The captions of a list, a Series or a DataFrame's `caption` column; a one-column DataFrame's only column,
    as MLflow hands over a list or a Series (the signature's input column has no name)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "caption" in model_input.columns:
            model_input = model_input["caption"]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(f"captions: a DataFrame needs a caption column (it has {list(model_input.columns)})")
    captions = list(model_input)
    if not all(isinstance(caption, str) for caption in captions):
        raise ValueError("captions: every caption must be a string")
    return captions


def registered_source(client: MlflowClient, logged: LoggedModel, trained: Config) -> ModelSource:
    """The registry version registered from `logged`, whose tags link its gallery indexes (the newest that
    links one, else the newest); its training run when it was never registered, as `pipelines/index.py` then
    tags the run."""
    versions = sorted(client.search_model_versions(f"source_path = 'models:/{logged.model_id}'"),
                      key=lambda found: found.creation_timestamp, reverse=True)
    sources = [ModelSource(f"models:/{found.name}/{found.version}", found.name, str(found.version),
                           found.run_id or "", logged.model_id) for found in versions]
    if not sources:
        run = logged.source_run_id or ""
        return ModelSource(f"runs:/{run}/{logged.name}", trained.tracking.model_name, "run", run, logged.model_id)
    return next((source for source in sources if linked_indexes(source, client.tracking_uri)), sources[0])


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> CaptionRanker:
    """MLflow's `loader_module` hook: `path` is MLflow's download of the logged model's folder, `model_config`
    the `PYFUNC_CONFIG` settings with the caller's overrides. Fails naming the version, and saying how to
    build one, when no gallery index is linked to it."""
    tracking = mlflow.get_tracking_uri()
    client = MlflowClient(tracking)
    logged = client.get_logged_model(Model.load(str(Path(path) / MLMODEL_FILE_NAME)).model_id)
    model, trained = load_local_model(Path(path), logged)
    settings = [f"{key}={value}" for key, value in (model_config or {}).items() if value is not None]
    cfg = load_config(None, [*settings, f"tracking.uri={tracking}"])
    return CaptionRanker(Retriever.for_model(model, trained, registered_source(client, logged, trained), cfg))
