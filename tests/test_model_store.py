"""Registered models are tensors and YAML: they round-trip exactly, a planted pickle never runs, and files
replaced in the artifact store after logging are refused."""

import os
import pickle
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from safetensors.torch import save_file

from hvd.config import load_config, to_yaml
from hvd.model import build_model
from hvd.registry.flavor import CONFIG_FILE, FLAVOR, HASH_TAG, PYFUNC_LOADER, WEIGHTS_FILE, sha256_file
from hvd.registry.models import load_model, register_model, scored_on
from hvd.registry.runs import active_tracking_uri, finish_run, start_or_resume_run
from hvd.registry.sources import ModelSourceError, load_model_source


class Planted(torch.nn.Module):
    """A module whose pickle runs a shell command when it is loaded, as an attacker's upload would."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


STORE_OVERRIDES = ["model.pretrained=null", "run.name=store", "tracking.model_name=hvd-store"]


@pytest.fixture
def store(tmp_path):
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.storage_path={tmp_path}/ray",
                             *STORE_OVERRIDES])
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
    assert set(flavors) == {FLAVOR, "python_function"} and flavors[FLAVOR]["format"] == "safetensors"
    assert flavors["python_function"]["loader_module"] == PYFUNC_LOADER  # a module of hvd, never a pickle

    # the tracking store holds each file's sha256, as the logged model's tags
    folder = artifact_folder(cfg, registered.model_id)
    tags = MlflowClient(cfg.tracking.uri).get_logged_model(registered.model_id).tags
    assert {key: value for key, value in tags.items() if key.startswith(HASH_TAG)} == {
        HASH_TAG + name: sha256_file(folder / name) for name in (WEIGHTS_FILE, CONFIG_FILE)}

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


def artifact_folder(cfg, model_id: str) -> Path:
    """The logged model's folder in the artifact store: a local folder here, a bucket prefix on a cluster."""
    location = MlflowClient(cfg.tracking.uri).get_logged_model(model_id).artifact_location
    return Path(local_file_uri_to_path(location))


def plant(folder: Path, name: str, tmp_path: Path) -> str:
    """Replace one file of a logged model with another valid one, as whoever can write the artifact store
    could; returns the planted file's sha256."""
    if name == WEIGHTS_FILE:
        torch.manual_seed(1)
        save_file(build_model(load_config(None, STORE_OVERRIDES).model).state_dict(), str(folder / name))
    else:
        other = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *STORE_OVERRIDES,
                                   "eval.topk=7"])
        (folder / name).write_text(to_yaml(other))
    return sha256_file(folder / name)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_file_replaced_in_the_artifact_store_is_refused_naming_it(store, tmp_path, name):
    cfg, run_id = store
    torch.manual_seed(0)
    registered = register_model(cfg, run_id, build_model(cfg.model), {"val/t2v/R1": 1.0})
    folder = artifact_folder(cfg, registered.model_id)
    logged = sha256_file(folder / name)
    planted = plant(folder, name, tmp_path)
    assert planted != logged

    # every way of naming the model reaches the same record
    for uri in (f"models:/{registered.name}/{registered.version}", f"models:/{registered.name}@champion",
                f"runs:/{run_id}/model", f"models:/{registered.model_id}"):
        with pytest.raises(ValueError, match=f"{name}: sha256 {logged} when logged, {planted} now"):
            load_model(uri, cfg.tracking.uri)
    with active_tracking_uri(cfg.tracking.uri), pytest.raises(ModelSourceError, match=f"--model .*{name}"):
        load_model_source(f"models:/{registered.name}@champion")


def test_a_model_logged_without_hashes_loads_unchecked_with_a_warning(store, tmp_path):
    """What a version registered by an older hvd gets: its files load, whatever they are, and it says so."""
    cfg, run_id = store
    registered = register_model(cfg, run_id, build_model(cfg.model), {})
    client = MlflowClient(cfg.tracking.uri)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        client.delete_logged_model_tag(registered.model_id, HASH_TAG + name)
    plant(artifact_folder(cfg, registered.model_id), WEIGHTS_FILE, tmp_path)

    with pytest.warns(UserWarning, match="records no sha256 of its files"):
        loaded, _ = load_model(f"models:/{registered.name}/{registered.version}", cfg.tracking.uri)
    torch.manual_seed(1)
    planted = build_model(cfg.model).state_dict()
    assert all(torch.equal(value, planted[key]) for key, value in loaded.state_dict().items())


def test_champion_moves_only_to_a_better_version_scored_on_the_same_data(store, caplog):
    cfg, run_id = store
    model = build_model(cfg.model)
    client = MlflowClient(cfg.tracking.uri)
    synthetic, msrvtt = scored_on("synthetic-demo", "f" * 64, "val"), scored_on("msrvtt", "a" * 64, "val")
    assert synthetic == "synthetic-demo@ffffffffffff/val"
    first = register_model(cfg, run_id, model, {"val/t2v/R1": 45.0}, msrvtt)
    assert first.champion
    # a synthetic model's 60 says nothing against an MSR-VTT model's 45: the champion stays, and says why
    other = register_model(cfg, run_id, model, {"val/t2v/R1": 60.0}, synthetic)
    assert not other.champion and "champion stays version 1, scored on msrvtt@aaaaaaaaaaaa/val" in caplog.text
    assert not register_model(cfg, run_id, model, {"val/t2v/R1": 44.0}, msrvtt).champion
    better = register_model(cfg, run_id, model, {"val/t2v/R1": 46.0}, msrvtt)
    assert better.champion
    assert client.get_model_version_by_alias(better.name, "champion").tags["scored_on"] == msrvtt
