"""Relative config paths resolve against HVD_ROOT (else the cwd), and a cluster that cannot share them stops the job."""

from pathlib import Path

import pytest
import ray

from hvd.config import PATH_KEYS, flatten, load_config
from hvd.registry.runs import tracking_uri
from hvd.runtime.paths import (
    ROOT_ENV,
    UnsharedPathError,
    project_root,
    require_shared_paths,
    resolve_path,
    resolve_tracking_uri,
)


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """A fresh working directory and no HVD_ROOT: the single-machine default."""
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path.resolve()


def test_relative_paths_join_the_root_uris_and_absolute_paths_do_not(tmp_path):
    assert resolve_path("data/shards", tmp_path) == str(tmp_path / "data/shards")
    assert resolve_path("/mnt/hvd/shards", tmp_path) == "/mnt/hvd/shards"
    assert resolve_path("s3://bucket/hvd/checkpoints", tmp_path) == "s3://bucket/hvd/checkpoints"
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/mlflow.db", tmp_path) == "sqlite:////abs/mlflow.db"
    for uri in ("http://127.0.0.1:5000", "databricks"):
        assert resolve_tracking_uri(uri, tmp_path) == uri


def test_the_root_is_hvd_root_else_the_working_directory(cwd, monkeypatch):
    assert project_root() == cwd
    shared = cwd / "shared"
    monkeypatch.setenv(ROOT_ENV, str(shared))
    assert project_root() == shared
    assert resolve_path("runs/ray") == str(shared / "runs/ray")


def test_load_config_resolves_every_path_key_once(cwd, monkeypatch):
    shared = cwd / "shared"
    monkeypatch.setenv(ROOT_ENV, str(shared))
    cfg = load_config(None, ["data.manifest=bench/manifest.jsonl", "model.pretrained=weights/clip.pt",
                             "eval.cache=s3://bucket/cache", "tracking.uri=sqlite:///runs.db"])
    flat = flatten(cfg)
    assert flat["synthetic.out"] == str(shared / "data/synthetic-demo")
    assert flat["data.manifest"] == str(shared / "bench/manifest.jsonl")
    assert flat["data.shards"] == str(shared / "data/shards-demo")
    assert flat["model.pretrained"] == str(shared / "weights/clip.pt")
    assert flat["train.storage_path"] == str(shared / "runs/ray")
    assert flat["eval.out"] == str(shared / "runs/eval")
    assert flat["eval.cache"] == "s3://bucket/cache"
    assert flat["tracking.uri"] == f"sqlite:///{shared}/runs.db"
    assert all(Path(flat[key]).is_absolute() or "://" in flat[key] for key in PATH_KEYS)


def test_the_default_mlflow_store_lands_under_the_root(cwd, monkeypatch):
    assert tracking_uri(load_config()) == f"sqlite:///{cwd}/mlflow.db"  # as before: the working directory
    monkeypatch.setenv(ROOT_ENV, str(cwd / "shared"))
    assert tracking_uri(load_config()) == f"sqlite:///{cwd}/shared/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(load_config()) == "http://127.0.0.1:5000"


def test_a_multi_node_cluster_without_hvd_root_stops_on_relative_paths(cwd):
    cfg = load_config(None, ["synthetic.out=/mnt/hvd/synth", "train.storage_path=s3://bucket/ckpt"])
    paths = {
        "synthetic.out": cfg.synthetic.out,
        "data.manifest": cfg.data.manifest,  # None: unused
        "data.shards": cfg.data.shards,  # relative: the job's own copy of the working directory
        "train.storage_path": cfg.train.storage_path,
        "tracking.uri": tracking_uri(cfg),  # sqlite:///mlflow.db, also in the working directory
    }
    with pytest.raises(UnsharedPathError) as err:
        require_shared_paths(paths, nodes=2)
    message = str(err.value)
    assert message.startswith(f"data.shards, tracking.uri: inside the driver's working directory {cwd},")
    assert "synthetic.out" not in message and "train.storage_path" not in message
    assert "Set HVD_ROOT on every node to a folder all nodes share" in message
    assert "object-store URI" in message

    require_shared_paths(paths, nodes=1)  # one node: its working directory is the only one


def test_the_guard_counts_the_alive_nodes_of_the_ray_cluster(cwd, monkeypatch):
    nodes = [{"Alive": True}, {"Alive": False}]  # a node that died does not count
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    require_shared_paths({"data.shards": "data/shards-demo"})
    nodes.append({"Alive": True})
    with pytest.raises(UnsharedPathError, match=r"^data\.shards: .* the 2 nodes of this cluster"):
        require_shared_paths({"data.shards": "data/shards-demo"})


def test_hvd_root_or_shared_paths_pass_the_guard(cwd, monkeypatch):
    require_shared_paths({"data.shards": "/mnt/hvd/shards", "train.storage_path": "s3://bucket/ckpt",
                          "tracking.uri": "http://127.0.0.1:5000", "data.manifest": None}, nodes=3)
    monkeypatch.setenv(ROOT_ENV, str(cwd / "shared"))
    cfg = load_config()
    require_shared_paths({"data.shards": cfg.data.shards, "tracking.uri": tracking_uri(cfg)}, nodes=3)
