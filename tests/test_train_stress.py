"""Smoke run of the stress harness (benchmarks/train_stress.py): the real `pipelines/train.py` once, on tiny data."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("train_stress", Path(__file__).parents[1] / "benchmarks" / "train_stress.py")
train_stress = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_stress)


@pytest.mark.slow
def test_stress_harness_runs_the_training_command_and_reads_its_summary(tmp_path, capsys):
    code = train_stress.main([
        "--runs", "1", "--logs", str(tmp_path / "logs"),
        "synthetic.preset=tiny", f"synthetic.out={tmp_path}/synth", f"data.shards={tmp_path}/shards",
        "train.batch_size=8", f"train.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "model.pretrained=null",  # one training run, as the harness counts them
    ])
    summary = json.loads(capsys.readouterr().out)
    log = (tmp_path / "logs" / "stress-1.log").read_text()
    assert code == 0, log[-3000:]
    assert summary["succeeded"] == 1 and summary["native_crashes"] == 0
    assert summary["each"][0]["worker_restarts"] == 0  # read from the command's own closing summary
    assert log.count("epoch 1/1 step 3/3 ") == 1  # each worker line reaches the terminal once
    assert log.count("Failed to query Ray Train Controller") <= 1  # the first, then one per 10 minutes at most
    assert "Total Progress" not in log  # no progress-bar redraws
