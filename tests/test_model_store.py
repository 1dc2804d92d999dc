"""Registered models are tensors and YAML: they round-trip exactly, and a planted pickle never runs."""

import os
import pickle

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from hvd.config import load_config
from hvd.eval.source import ModelSourceError, load_model_source
from hvd.mlflow_flavor import CONFIG_FILE, FLAVOR, WEIGHTS_FILE
from hvd.model import build_model
from hvd.tracking import active_tracking_uri, finish_run, load_model, register_model, start_or_resume_run


class Planted(torch.nn.Module):
    """A module whose pickle runs a shell command when it is loaded, as an attacker's upload would."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def store(tmp_path):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "model.pretrained=null",
                             "run.name=store", "tracking.model_name=hvd-store"])
    run = start_or_resume_run(cfg, {})
    yield cfg, run.run_id
    finish_run(cfg.tracking.uri, run.run_id)


def test_registered_model_is_tensors_and_config_and_loads_back_exactly(store):
    cfg, run_id = store
    torch.manual_seed(0)
    model = build_model(cfg.model)
    registered = register_model(cfg, run_id, model, {"val/t2v/R1": 1.0})
    uri = f"models:/{registered.name}/{registered.version}"

    with active_tracking_uri(cfg.tracking.uri):
        files = {f.path for f in mlflow.artifacts.list_artifacts(uri)}
        flavors = mlflow.models.Model.load(uri).flavors
    assert files == {"MLmodel", WEIGHTS_FILE, CONFIG_FILE}
    assert set(flavors) == {FLAVOR} and flavors[FLAVOR]["format"] == "safetensors"

    loaded, loaded_cfg = load_model(uri, cfg.tracking.uri)
    assert loaded_cfg == cfg and not loaded.training
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_a_planted_pickle_version_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    marker = tmp_path / "pwned"
    with active_tracking_uri(uri), mlflow.start_run():
        mlflow.pytorch.log_model(Planted(str(marker)), name="model", pip_requirements=[],
                                 serialization_format="pickle", registered_model_name="hvd")
    marker.unlink(missing_ok=True)  # logging may have loaded it once

    # The attack is real: MLflow's own PyTorch loader runs the command.
    with active_tracking_uri(uri):
        try:
            mlflow.pytorch.load_model("models:/hvd/1")
        except Exception:
            pass
    assert marker.exists()
    marker.unlink()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ModelSourceError, match=r"models:/hvd@latest.*pytorch.*never unpickles"):
        load_model_source("models:/hvd@latest")
    assert not marker.exists()


def test_a_pickle_posing_as_the_hvd_flavor_is_refused_and_runs_nothing(store, tmp_path):
    cfg, run_id = store
    registered = register_model(cfg, run_id, build_model(cfg.model), {})
    client = MlflowClient(cfg.tracking.uri)
    source = client.get_model_version(registered.name, registered.version).source
    with active_tracking_uri(cfg.tracking.uri):
        folder = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "copy"))
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as file:
        pickle.dump(Planted(str(marker)), file)
    with active_tracking_uri(cfg.tracking.uri), mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(folder, "planted")
    planted = f"runs:/{run_id}/planted"

    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} is not a safetensors file"):
        load_model(planted, cfg.tracking.uri)
    assert not marker.exists()
