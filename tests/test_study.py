"""The mechanism study's smoke grid end to end: Ray Tune trials, each a child MLflow run of one parent."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hvd.config import Config
from hvd.train.study import GRIDS, report, trial_config

ROOT = Path(__file__).resolve().parents[1]


def test_head_variants_set_their_switches_and_plain_heads_only_the_head():
    knobs = {"event_fraction": 0.3, "entity_scale": 0.3, "seed": 1}
    plain = trial_config(Config(), "hcmi", knobs | {"head": "hcmi-plain"})
    assert (plain.model.head, plain.model.hcmi.label_denoising, plain.model.hcmi.sample_enhancement) == ("hcmi", False, False)
    assert plain.run.name == "hcmi-ef0.3-es0.3-hcmi-plain-s1"
    only = trial_config(Config(), "hcmi", knobs | {"head": "hcmi-no-enhancement"})
    assert (only.model.hcmi.label_denoising, only.model.hcmi.sample_enhancement) == (True, False)
    full = trial_config(Config(), "hcmi", knobs | {"head": "hcmi"})
    assert (full.model.head, full.model.hcmi.label_denoising, full.model.hcmi.sample_enhancement) == ("hcmi", True, True)
    assert len(GRIDS["hcmi"].trials) == 12


@pytest.mark.slow
def test_smoke_grid_runs_every_trial_under_one_parent_run(tmp_path):
    # No tracking.uri: the default store under the working directory must hold the parent and every child,
    # although Tune runs each trial in a directory of its own.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, str(ROOT / "pipelines/study.py"), "--grid", "smoke", f"synthetic.out={tmp_path}/synth",
        f"pretrain.out={tmp_path}/pretrained", f"train.storage_path={tmp_path}/ray",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 0.25 | 0.15 |" in result.stdout  # the summary table: one cell, a column per head

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-smoke").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["head"] for r in children) == ["hvd", "meanp"]
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "study.png"}
    for child in children:
        assert child.data.tags["event_fraction"] == "0.25" and child.data.tags["entity_scale"] == "0.15"
        assert child.data.params["synthetic.entity_scale"] == "0.15"
        mean = parent.data.metrics[f"{child.data.tags['head']}/ef0.25_es0.15/t2v_R1_mean"]
        assert mean == pytest.approx(child.data.metrics["test/t2v/R1"])  # one seed: the mean is the run
    assert parent.data.tags["trials_reported"] == "2"
    # a study stopped early is summarised from its finished children by `--report`, which is what ran here
    (again,) = [c for c in report(client, parent.info.run_id) if c.head == "meanp"]
    assert again.t2v_r1 == [parent.data.metrics["meanp/ef0.25_es0.15/t2v_R1_mean"]]
    # one warm start for the whole grid, trained by the first trial and reused by the second
    assert len(list(Path(tmp_path, "pretrained").glob("*.safetensors"))) == 1

    # A study stopped while its meanp trial ran: `--resume` runs that trial alone, under the same parent, and
    # the trial resumes its own MLflow run from its last checkpoint; a config the trials did not train with
    # is refused first.
    meanp = next(c for c in children if c.data.tags["head"] == "meanp")
    client.set_terminated(meanp.info.run_id, status="FAILED")
    resume = [*command, "--resume", parent.info.run_id]
    refused = subprocess.run([*resume, "train.lr=0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "train.lr: " in refused.stderr and "-> 0.5" in refused.stderr
    result = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming parent run {parent.info.run_id}: 1 of 2 trials to run" in result.stdout
    assert f"MLflow run {meanp.info.run_id} (resumed" in result.stdout + result.stderr
    runs = client.search_runs([experiment])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the same parent and children
    assert client.get_run(parent.info.run_id).data.tags["trials_reported"] == "2"
