"""Smoke run of the stress harness (benchmarks/train_stress.py): the real `pipelines/train.py` once, on tiny data
(the run `test_listeners.py` watches too)."""

import pytest


@pytest.mark.slow
def test_stress_harness_runs_the_training_command_and_reads_its_summary(training_command):
    summary, log = training_command.summary, training_command.log
    assert summary["succeeded"] == 1, log[-3000:]
    assert summary["native_crashes"] == 0
    assert summary["each"][0]["worker_restarts"] == 0  # read from the command's own closing summary
    assert log.count("epoch 1/1 step 3/3 ") == 1  # each worker line reaches the terminal once
    assert log.count("Failed to query Ray Train Controller") <= 1  # the first, then one per 10 minutes at most
    assert "Total Progress" not in log  # no progress-bar redraws
