"""Smoke run of benchmarks/epoch_starts.py: a real (tiny) warm start per lead, its epochs' first-step waits read
back from the run's MLflow store."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.slow

_SPEC = importlib.util.spec_from_file_location("epoch_starts", Path(__file__).parents[1] / "benchmarks" / "epoch_starts.py")
epoch_starts = sys.modules["epoch_starts"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(epoch_starts)


def test_each_lead_trains_afresh_and_reports_every_epochs_first_wait(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        tiny = ["pretrain.train_stills=128", "pretrain.val_stills=32", "pretrain.epochs=3", "pretrain.batch_size=32",
                "train.num_workers=1", f"train.storage_path={tmp_path}/ray"]
        runs = [epoch_starts.measure(tiny, lead, tmp_path / "out") for lead in (0, 2)]
    finally:
        ray.shutdown()
    assert [run["lead"] for run in runs] == [0, 2] and runs[0]["run_id"] != runs[1]["run_id"]  # the second trained too
    for run in runs:
        assert len(run["epoch_start_wait_s"]) == 3 and all(wait >= 0 for wait in run["epoch_start_wait_s"])
