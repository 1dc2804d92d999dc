"""The MLflow record reads at a glance: experiments are marked model training and links open the UI's runs
view, and each registered version describes itself and carries its signature; on real SQLite stores."""

import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from hvd.config import load_config
from hvd.model import build_model
from hvd.registry.flavor import SIGNATURE
from hvd.registry.models import register_model, scored_on
from hvd.registry.runs import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    UI_VIEW,
    active_tracking_uri,
    experiment_id,
    finish_run,
    run_url,
    start_or_resume_run,
)


def test_experiments_are_marked_model_training_when_made_and_when_met_without_a_chosen_kind(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    before = client.create_experiment("made-before-the-tag")
    guessed = client.create_experiment("guessed-by-a-ui", tags={EXPERIMENT_KIND_TAG: "no_inferred_type"})
    chosen = client.create_experiment("chosen-by-someone", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    made = experiment_id(client, "new")
    assert experiment_id(client, "made-before-the-tag") == before
    assert experiment_id(client, "guessed-by-a-ui") == guessed
    assert experiment_id(client, "chosen-by-someone") == chosen
    kinds = {id_: client.get_experiment(id_).tags.get(EXPERIMENT_KIND_TAG) for id_ in (made, before, guessed, chosen)}
    assert kinds == {made: EXPERIMENT_KIND, before: EXPERIMENT_KIND, guessed: EXPERIMENT_KIND,
                     chosen: "genai_development"}
    # MLflow 3.17's UI takes its GenAI / model-training view from the link, not from the tag
    assert run_url(client.tracking_uri, made, "abc").endswith(f"/#/experiments/{made}/runs/abc{UI_VIEW}")


@pytest.fixture
def store(tmp_path):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.storage_path={tmp_path}/ray",
                             "model.pretrained=null", "run.name=record", "tracking.model_name=hvd-record",
                             "tracking.experiment=record"])
    run = start_or_resume_run(cfg, {})
    yield cfg, run
    finish_run(cfg.tracking.uri, run.run_id)


def test_a_registered_version_describes_itself_and_shows_its_signature(store, monkeypatch):
    cfg, run = store
    monkeypatch.setattr(sys, "argv", ["pipelines/train.py", "--config", "configs/demo.yaml", "train.epochs=3"])
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_experiment(run.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    torch.manual_seed(0)
    data = scored_on("synthetic-demo", "f" * 64, "val")
    registered = register_model(cfg, run.run_id, build_model(cfg.model), {"val/t2v/R1": 40.0}, data,
                                test={"t2v/R1": 57.5, "v2t/R1": 54.0, "t2v/R5": 80.0})

    version = client.get_model_version(registered.name, registered.version)
    description = version.description
    assert f"**{cfg.model.head}** head on **{cfg.model.preset}** CLIP, trained on **synthetic-demo**" in description
    assert f"(chosen on `{data}`)" in description
    assert "Test R@1: text-to-video **57.5**, video-to-text **54.0**." in description
    assert "Command: `python pipelines/train.py --config configs/demo.yaml train.epochs=3`" in description
    assert f"Training run: [{run.run_id}]({run_url(cfg.tracking.uri, run.experiment_id, run.run_id)})" in description
    assert version.tags["head"] == cfg.model.head and version.tags["source_run"] == run.run_id  # the tags stay
    with active_tracking_uri(cfg.tracking.uri):  # what the version page reads its schema from
        assert mlflow.models.get_model_info(f"models:/{registered.name}/{registered.version}").signature == SIGNATURE

    untested = register_model(cfg, run.run_id, build_model(cfg.model), {"val/t2v/R1": 1.0})
    assert "Test R@1: not measured (no test split)." in client.get_model_version(
        untested.name, untested.version).description
