"""MLflow's standard face: `mlflow.pyfunc.load_model("models:/hvd@champion").predict(captions)`, in a fresh
process, ranks the version's linked gallery exactly as `Retriever.search` does; the logged model holds no
pickle; a version without an index says how to build one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.store.artifact.models_artifact_repo import REGISTERED_MODEL_META_FILE_NAME

from hvd.model import build_model
from hvd.registry.flavor import CONFIG_FILE, SIGNATURE, WEIGHTS_FILE
from hvd.registry.models import register_model
from hvd.registry.runs import active_tracking_uri, finish_run, start_or_resume_run
from hvd.search.index_job import build_index
from hvd.search.retriever import Retriever

CAPTIONS = ["a red circle rises", "a blue square slides left", "two green dots"]

# What a user types, in a process that has never imported hvd: each input form, one JSON line of records each.
FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
captions = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/hvd@champion")
for ranked in (model.predict(captions, params={"top": 3}), model.predict(pd.Series(captions)),
               model.predict(pd.DataFrame({"caption": captions}), params={"top": 3})):
    print(ranked.to_json(orient="records"))
"""


@pytest.fixture(scope="module")
def indexed(registered):
    """`registered`'s champion with a gallery index of its benchmark's test split, built by the index job."""
    build_index(registered["cfg"], f"models:/hvd/{registered['version']}", manifest=registered["manifest"])
    return registered


def rows(retriever: Retriever, top: int) -> list[dict]:
    """`Retriever.search`'s rankings of `CAPTIONS` as the pyfunc's records."""
    return [{"caption": caption, "rank": hit.rank, "video_id": hit.video_id, "score": hit.score,
             "stage1_score": hit.stage1_score}
            for caption, hits in zip(CAPTIONS, retriever.search(CAPTIONS, top), strict=True) for hit in hits]


@pytest.mark.slow
def test_pyfunc_in_a_fresh_process_ranks_as_the_retriever_and_holds_no_pickle(indexed):
    cfg, root = indexed["cfg"], indexed["root"]
    env = {key: value for key, value in os.environ.items() if key != "HVD_ROOT"}
    env["MLFLOW_TRACKING_URI"] = cfg.tracking.uri  # the index downloads into <cwd>/data/indexes: root's
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(CAPTIONS)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    top3, default_top, from_frame = (json.loads(line) for line in done.stdout.splitlines()[-3:])

    retriever = Retriever.open("models:/hvd@champion", cfg)
    for predicted, top in ((top3, 3), (default_top, 10), (from_frame, 3)):
        expected = rows(retriever, top)
        assert [(row["caption"], row["rank"], row["video_id"]) for row in predicted] == [
            (row["caption"], row["rank"], row["video_id"]) for row in expected]
        for key in ("score", "stage1_score"):
            assert [row[key] for row in predicted] == pytest.approx([row[key] for row in expected], abs=1e-5)
    assert len(default_top) == len(CAPTIONS) * 8  # the signature's default top 10, of an 8-video gallery
    assert (root / "data" / "indexes").is_dir()

    with active_tracking_uri(cfg.tracking.uri):
        info = mlflow.models.get_model_info("models:/hvd@champion")
        files = {artifact.path for artifact in mlflow.artifacts.list_artifacts("models:/hvd@champion")}
        flavors = mlflow.models.Model.load("models:/hvd@champion").flavors
    assert info.signature == SIGNATURE
    assert list(info.signature.outputs.input_names()) == ["caption", "rank", "video_id", "score", "stage1_score"]
    # no python_model.pkl, no cloudpickle; MLflow's loader leaves registered_model_meta (YAML: name, version)
    # in a local store's model folder, which it reads in place
    assert files - {REGISTERED_MODEL_META_FILE_NAME} == {"MLmodel", WEIGHTS_FILE, CONFIG_FILE}
    pyfunc = flavors["python_function"]
    assert pyfunc["loader_module"] == "hvd.search.pyfunc" and "python_model" not in pyfunc


@pytest.mark.slow
def test_a_version_without_its_index_fails_saying_how_to_build_one(indexed):
    cfg = indexed["cfg"]
    run = start_or_resume_run(cfg, {})
    torch.manual_seed(1)
    second = register_model(cfg, run.run_id, build_model(cfg.model), {"val/t2v/R1": 0.0})
    finish_run(cfg.tracking.uri, run.run_id)
    assert not second.champion

    with active_tracking_uri(cfg.tracking.uri):
        with pytest.raises(ValueError, match=(f"models:/hvd/{second.version}: no gallery index yet; build one with "
                                              f"python pipelines/index.py --model models:/hvd/{second.version} "
                                              "--shards DIR")):
            mlflow.pyfunc.load_model(f"models:/hvd/{second.version}")
        # the champion has an index, but not of the benchmark asked for
        with pytest.raises(ValueError, match=r"models:/hvd/1: no index of msrvtt/test \(it has: index.bench.test\)"):
            mlflow.pyfunc.load_model("models:/hvd@champion", model_config={"eval.benchmark": "msrvtt"})
