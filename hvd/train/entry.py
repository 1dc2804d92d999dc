"""The function Ray Train runs on each worker, importable without torch, open_clip or MLflow.

Ray Train's controller unpickles the training function, which imports the module it comes from; importing
`hvd.train.loop` there would cost every run seconds of imports the controller never uses (one of several
processes Ray Train starts one after another before the first step). The worker asks for its data shard
first, which starts Ray Data's split coordinator, and imports the loop while that process starts.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `hvd.train.loop.run_worker` on the worker's train shards."""
    import ray.train

    # the train split once per dataset the epochs take turns over; every worker asks at once: a barrier
    shards = [ray.train.get_dataset_shard(name) for name in loop_config["datasets"]]
    from hvd.train.loop import run_worker

    run_worker(loop_config, shards)
