"""Training end to end on the tiny synthetic benchmark: Ray Train with 2 gloo workers, MLflow on SQLite."""

from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from hvd.config import load_config
from hvd.data.shards import read_shards
from hvd.eval.encode import encode_split
from hvd.model import build_tokenizer
from hvd.registry.models import load_model, version_model_id
from hvd.registry.runs import UI_VIEW, RunConfigMismatch, finish_run, start_or_resume_run, tracking_uri
from hvd.train.fit import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    ray.init(num_cpus=2, include_dashboard=False)
    yield tmp_path_factory.mktemp("train")
    ray.shutdown()


def tiny(workdir: Path, name: str, *overrides: str):
    return load_config(
        None,
        [
            "synthetic.preset=tiny",
            f"synthetic.out={workdir}/synth",
            f"data.shards={workdir}/shards",
            "train.epochs=2",
            "train.batch_size=8",  # 24 train videos, 2 workers x 4: 3 steps per epoch
            f"train.storage_path={workdir}/ray",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.experiment={name}",
            f"run.name={name}",
            "model.pretrained=null",  # from scratch; the study's smoke grid trains and checks the warm start
            *overrides,
        ],
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_that_loses_a_worker_resumes_into_the_same_run_and_registers_a_model_that_loads_and_scores(workdir):
    """One Ray Train run (about a minute of start-up each) for both: a lost worker changes nothing in what the run
    records and registers but its restart. From scratch: the warm start is trained and checked by the study's smoke
    grid."""
    # checkpoints at steps 2 (mid-epoch), 3 (epoch end), 4 (mid-epoch); the last worker dies at step 5
    cfg = tiny(workdir, "fault", "train.max_failures=1", "train.fail_at_step=5", "train.checkpoint_every_steps=2")
    outcome = fit(cfg)
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("fault").experiment_id])
    assert [r.info.run_id for r in runs] == [outcome.run_id]
    # from the newest checkpoint: the fault waits until Ray Train has registered the step-4 report
    assert _history(client, outcome.run_id, "train/resumed_from_step") == [(4, 4.0)]
    assert [r.step for r in outcome.restarts] == [4]  # what the final summary reports
    loss_steps = [step for step, _ in _history(client, outcome.run_id, "train/loss")]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 6  # the uninterrupted run's last step

    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.head"] == "hvd" and run.data.params["train.epochs"] == "2"
    assert run.data.tags["head"] == "hvd" and len(run.data.tags["dataset_fingerprint"]) == 16
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_s", "val/t2v/R1", "val/v2t/MdR",
                "test/t2v/R1"):
        assert key in run.data.metrics, key
    assert [step for step, _ in _history(client, outcome.run_id, "val/t2v/R1")] == [3, 6]
    # each epoch's first step's wait for data, and the restart's (epoch 2 read from the split's second copy)
    assert [step for step, _ in _history(client, outcome.run_id, "train/epoch_start_wait_s")] == [1, 4, 5]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "training_curves.png"} <= artifacts

    # the MLflow record links everything: who ran what, on which data, and the model's own metrics
    tags = run.data.tags
    assert tags["mlflow.source.name"] and tags["mlflow.user"] and tags["mlflow.source.git.commit"]
    assert "hvd head on tiny CLIP, trained on synth (24 videos)" in tags["mlflow.note.content"]
    assert tags["restarts"] == "1"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synth" and dataset.dataset.digest == tags["dataset_fingerprint"]
    assert outcome.run_url.endswith(f"/#/experiments/{run.info.experiment_id}/runs/{outcome.run_id}{UI_VIEW}")

    registered = outcome.model
    version = client.get_model_version(registered.name, registered.version)
    assert version.tags["source_run"] == outcome.run_id and float(version.tags["val/t2v/R1"]) >= 0
    assert (f"Test R@1: text-to-video **{outcome.test['t2v/R1']:.1f}**, video-to-text **{outcome.test['v2t/R1']:.1f}**"
            in version.description) and outcome.run_url in version.description
    assert version_model_id(version) == registered.model_id
    logged = client.get_logged_model(registered.model_id)
    model_metrics = {m.key: m.value for m in logged.metrics}
    assert model_metrics["test/t2v/R1"] == run.data.metrics["test/t2v/R1"]
    assert str(client.get_model_version_by_alias(registered.name, "champion").version) == registered.version

    model, loaded_cfg = load_model(f"models:/{registered.name}@latest", outcome.tracking_uri)
    assert loaded_cfg == cfg
    test = read_shards(cfg.data.shards, "test")
    encoded = encode_split(model, test, build_tokenizer(cfg.model, cfg.data.max_words))
    scores = model.score(encoded.text, encoded.video)
    assert scores.shape == (test.num_rows, test.num_rows) and torch.isfinite(scores).all()


def test_rerun_of_a_failed_run_resumes_it(workdir):
    cfg = tiny(workdir, "resume", "train.fail_at_step=4", "train.max_failures=0")  # the first attempt fails in epoch 2
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's exit in its own error type
        fit(cfg)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (failed,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert failed.info.status == "FAILED"
    assert [step for step, _ in _history(client, failed.info.run_id, "val/t2v/R1")] == [3]

    # Other settings never resume it: refused, naming the key, before any training ...
    changed = tiny(workdir, "resume", "train.fail_at_step=4", "train.max_failures=0", "model.hvd.frame_keep=0.25")
    with pytest.raises(RunConfigMismatch, match=rf"{failed.info.run_id} \(FAILED\).*model.hvd.frame_keep: 0.5 -> 0.25\)"):
        fit(changed)
    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    # ... or, with run.resume=never, start a run of their own that records what it trains with.
    fresh = start_or_resume_run(replace(changed, run=replace(changed.run, resume="never")), {})
    assert not fresh.resumed and fresh.run_id != failed.info.run_id
    assert client.get_run(fresh.run_id).data.params["model.hvd.frame_keep"] == "0.25"
    finish_run(tracking_uri(cfg), fresh.run_id)

    outcome = fit(cfg)  # same command again: the fault fired once already
    assert outcome.run_id == failed.info.run_id
    assert _history(client, outcome.run_id, "train/resumed_from_step") == [(3, 3.0)]
    assert [step for step, _ in _history(client, outcome.run_id, "val/t2v/R1")] == [3, 6]
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
