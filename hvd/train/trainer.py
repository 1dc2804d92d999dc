"""The driver side of training: data ready -> MLflow run -> Ray Train fit -> test -> register."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from hvd.config import Config, to_yaml
from hvd.data.manifest import fingerprint
from hvd.data.prepare import ensure_ray, prepare
from hvd.data.shards import open_shards, read_shards, shard_summary
from hvd.data.synthetic import generate
from hvd.eval.encode import evaluate_split
from hvd.model import build_model, build_tokenizer
from hvd.tracking import MetricLogger, finish_run, register_model, start_or_resume_run, tracking_uri
from hvd.train.checkpoint import load_state
from hvd.train.loop import SCORE_KEY, train_loop_per_worker
from hvd.train.plots import log_training_curves


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    model_name: str
    version: str
    champion: bool
    val: dict[str, float]
    test: dict[str, float]


def prepare_data(cfg: Config) -> tuple[Path, Path]:
    """(manifest, shards): the synthetic benchmark when no manifest is given; both steps are cached."""
    manifest = Path(cfg.data.manifest) if cfg.data.manifest else generate(cfg.synthetic)
    ensure_ray()
    print(prepare(cfg, manifest, Path(cfg.data.shards), overwrite=cfg.data.overwrite), flush=True)
    return manifest, Path(cfg.data.shards)


def steps_per_epoch(cfg: Config, train_samples: int) -> int:
    """Batches each worker trains per epoch: Ray Data splits the rows equally, drop_last drops the rest."""
    per_worker_batch = cfg.train.batch_size // cfg.train.num_workers
    steps = (train_samples // cfg.train.num_workers) // per_worker_batch
    if steps == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the {train_samples} training samples")
    return steps


def storage_location(storage_path: str) -> str:
    """Object storage URIs (`s3://`, `gs://`) as given; local paths absolute, since workers have another cwd."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def _check(cfg: Config) -> None:
    if cfg.train.batch_size % cfg.train.num_workers:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must divide evenly over train.num_workers={cfg.train.num_workers}"
        )


def fit(cfg: Config) -> TrainOutcome:
    _check(cfg)
    manifest, shards = prepare_data(cfg)
    splits = shard_summary(shards)["splits"]
    val_split = "val" if splits.get("val") else "test"
    train_data = open_shards(shards, "train", ordered=False)
    train_samples = splits["train"]
    if cfg.data.expand_captions:
        train_data = train_data.flat_map(lambda row: [{**row, "captions": [c]} for c in row["captions"]])
        train_samples = int(read_shards(shards, "train", ["captions"])["captions"].combine_chunks().value_lengths().sum())
    steps = steps_per_epoch(cfg, train_samples)

    tags = {"dataset_fingerprint": fingerprint(manifest), "head": cfg.model.head, "preset": cfg.model.preset,
            "val_split": val_split}
    tracked = start_or_resume_run(cfg, tags)
    uri = tracking_uri(cfg)
    print(f"MLflow run {tracked.run_id} ({'resumed' if tracked.resumed else 'new'}) at {uri}", flush=True)
    storage = storage_location(cfg.train.storage_path)
    ray_run_name = f"{cfg.run.name}-{tracked.run_id[:8]}"  # one Ray run per MLflow run: resume finds both

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config_yaml": to_yaml(cfg),
            "run_id": tracked.run_id,
            "tracking_uri": uri,
            "shards": str(shards.resolve()),
            "val_split": val_split,
            "steps_per_epoch": steps,
            "fault_marker": f"{storage}/{ray_run_name}/.fault_injected",
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {}), **cfg.train.worker_resources
            },
            placement_strategy=cfg.train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
            ),
        ),
        datasets={"train": train_data},
    )
    try:
        result = trainer.fit()
    except Exception:
        finish_run(uri, tracked.run_id, failed=True)  # FAILED, not FINISHED: the same command resumes it
        raise

    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1].get(SCORE_KEY, -1.0))
    with best_checkpoint.as_directory() as directory:
        state = load_state(directory)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)

    val = {k.removeprefix("val/"): v for k, v in best_metrics.items() if k.startswith("val/")}
    test = evaluate_split(model, read_shards(shards, "test"), tokenizer, cfg.eval.batch_size) if splits.get("test") else {}
    MetricLogger(uri, tracked.run_id).log({f"test/{k}": v for k, v in test.items()}, state["step"])
    log_training_curves(uri, tracked.run_id)
    name, version, champion = register_model(cfg, tracked.run_id, model, {f"val/{k}": v for k, v in val.items()})
    finish_run(uri, tracked.run_id)
    return TrainOutcome(tracked.run_id, uri, name, version, champion, val, test)

