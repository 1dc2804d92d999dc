"""One structured config for every stage: YAML files in `configs/` plus `key=value` overrides.

The same `Config` object travels from the command line to data preparation, training, evaluation
and, flattened, into MLflow params, so a run is reproducible from what MLflow recorded. Its relative
paths are made absolute under the project root (`HVD_ROOT`, see `hvd.paths`) as it is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from hvd.errors import InputError
from hvd.paths import resolve_path, resolve_tracking_uri

WARM_START = "synthetic"  # model.pretrained: the preset's CLIP pretrained on synthetic stills (hvd.train.warm_start)


class ConfigError(InputError, ValueError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class RunConfig:
    name: str = "hvd-tiny-demo"  # run name in MLflow and Ray Train; reusing it resumes the run
    seed: int = 0
    resume: str = "auto"  # auto: an unfinished run of this name resumes if its config is this one; never: a new run


@dataclass
class SyntheticConfig:
    """The synthetic benchmark; `None` fields take the preset's value."""

    preset: str = "demo"  # tiny | demo | full | long
    out: str = "data/synthetic-demo"
    seed: int = 0
    num_train: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    frame_size: int | None = None  # pixels, square frames
    fps: int | None = None
    duration_s: float | None = None
    event_fraction: float = 0.5  # share of the clip in which the described event happens
    entity_scale: float = 0.3  # target object size relative to the frame side
    num_distractors: int = 2
    train_captions: int = 5  # captions per train video; val/test videos get one
    temporal: bool = False  # the target moves and captions name the motion (order matters: temporal heads)
    workers: int = 0  # generator processes; 0 = one per CPU


@dataclass
class DataConfig:
    manifest: str | None = None  # benchmark manifest (JSONL); the synthetic one when None
    shards: str = "data/shards-demo"  # Parquet shard directory written by prepare
    overwrite: bool = False  # replace shards prepared with other settings
    num_frames: int = 12
    sample_mode: str = "uniform"  # uniform | fps
    frame_size: int = 64  # short side resize, then centre crop to a square
    frame_codec: str = "jpeg"  # jpeg | raw
    jpeg_quality: int = 90
    min_duration_fraction: float = 0.9  # decodable frames must cover this share of the declared duration
    keep_truncated: bool = False  # keep (flagged) instead of quarantining a clip that covers less
    max_words: int = 32  # caption tokens, including start and end tokens
    expand_captions: bool = False  # every caption a sample, instead of one random caption per epoch
    decode_concurrency: int = 2  # decode tasks running at once
    decode_cpus: float = 1.0  # CPUs reserved by each decode task
    decode_timeout_s: float = 120.0  # a video still decoding after this is stopped and quarantined (timeout)
    decode_memory_mb: int = 4096  # address-space limit of each decode child; a video that needs more is quarantined
    max_video_frames: int = 1_000_000  # a video declaring more frames is quarantined (too_large) before decoding
    max_video_pixels: int = 4096 * 4096  # width x height; larger frames are quarantined (too_large)
    max_video_duration_s: float = 6 * 3600.0  # longer videos are quarantined (too_large)
    shard_videos: int = 256  # at most this many videos per decode task, so per Parquet shard file
    decode_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per decode task
    train_decode_cpus: float = 0.5  # CPUs per Ray Data task that decodes and tokenises training batches


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | tiny-p8 | ViT-B-32 | ViT-B-16
    head: str = "hvd"  # hvd | meanp | xpool | eercf | hvp | hcmi (README: "Heads")
    pretrained: str | None = None  # local CLIP checkpoint file (nothing is downloaded); synthetic: the warm start
    quick_gelu: bool = True  # OpenAI CLIP weights use QuickGELU; most LAION open_clip weights do not
    frame_keep: float = 0.5  # FFSM: share of frames kept per (text, video) pair
    pfcm_steps: int = 3  # PFCM: rounds of density-peak compression
    pfcm_scope: str = "video"  # PFCM clusters all the video's patches together (video, as HVP-Net) or each frame's (frame)
    pfcm_ratio: float = 0.5  # PFCM: share of tokens kept per round
    dpc_k: int = 3  # DPC-KNN neighbours, the token itself included
    score_budget_mb: int = 512  # memory cap for one chunk of pairwise scoring
    layers: list[int] = field(default_factory=list)  # hvp: ViT blocks matched with the caption; empty: first, middle, last
    temporal_layers: int = 4  # eercf, hcmi: blocks of the transformer over frames (CLIP4Clip's seqTransf)
    pearson_weight: float = 0.001  # eercf: weight of the Pearson constraint in the loss (EERCF's)
    clip_ratio: float = 0.25  # hcmi: clips per real frame (12 frames -> 3 clips)
    phrase_ratio: float = 0.25  # hcmi: phrases per word token
    label_denoising: bool = True  # hcmi: soft InfoNCE targets shared with near-duplicate captions of the batch
    sample_enhancement: bool = True  # hcmi: negatives near the positive's score count twice in the InfoNCE


@dataclass
class PretrainConfig:
    """`model.pretrained=synthetic`: the preset's CLIP trained image-text on stills of the synthetic world first
    (pipelines/pretrain.py), cached by fingerprint under `out` and registered in MLflow as clip-<preset>-synthetic."""

    train_stills: int = 20000
    val_stills: int = 500
    epochs: int = 3
    batch_size: int = 128
    lr: float = 5e-4  # 1e-3 and 2e-3 learn the stills more slowly in the same three epochs (docs/benchmarks.md)
    out: str = "data/pretrained"


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    epochs: int = 5
    batch_size: int = 32  # global batch, split across workers
    lr: float = 1e-3  # new modules, and the backbone when training from scratch (the tiny demo)
    backbone_lr: float = 2e-4  # a pretrained backbone (the tiny warm start; real CLIP: 1e-7); from scratch it uses `lr`
    weight_decay: float = 0.2
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    max_skipped_steps: int = 5  # steps in a row with a non-finite loss or gradient (skipped) before the run stops
    checkpoint_every_steps: int = 20  # also checkpoint every N steps (0 = only at epoch ends): what a restart redoes
    max_failures: int = 2  # worker group restarts from the last checkpoint before the run fails
    storage_path: str = "runs/ray"
    fail_at_step: int = -1  # test-only fault injection: a worker exits at this global step
    placement_strategy: str = "PACK"  # how workers spread over nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker


@dataclass
class EvalConfig:
    mode: str = "exhaustive"  # exhaustive | two_stage
    topk: int = 50  # two_stage: candidates per query that stage 2 rescores with the full model
    dsl: bool = False  # also report dual-softmax (dsl_) metrics; needs every pair's score (exhaustive)
    compare: bool = False  # two_stage: also run exhaustive and report it beside
    batch_size: int = 64
    split: str = "test"  # which split of the benchmark to evaluate
    benchmark: str | None = None  # MLflow experiment eval/<benchmark>; default: the manifest's folder name
    out: str = "runs/eval"  # JSON report and pictures go to <out>/<benchmark>/<model>-v<version>/
    cache: str = "data/eval-shards"  # where --manifest benchmarks are prepared (reused when unchanged)
    num_actors: int = 0  # encoding actors; 0 = one per GPU, or one CPU actor without GPUs
    explain_queries: int = 3  # queries drawn with what the head weighed each frame by (hvd: FFSM, PFCM clusters)


@dataclass
class IndexConfig:
    ivf_from: int = 100_000  # galleries of at least this many videos get an IVF index (approximate); smaller: flat, exact
    nprobe: int = 32  # IVF: inverted lists searched per query (more: nearer exact search, slower)
    use: bool = True  # eval.mode=two_stage reuses the model version's index of the benchmark when one matches
    cache: str = "data/indexes"  # indexes downloaded from MLflow (and built here) are kept under <cache>/<run id>


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db under the project root
    experiment: str = "hvd"
    model_name: str = "hvd"  # registered model name


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The product's default starts from the synthetic warm start; a bare ModelConfig() from random weights.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained=WARM_START))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# What each value may be, declared once: load_config checks a whole Config, and the library checks the
# pieces it is handed directly (`check_values`), both from these tables.
CHOICES: dict[str, tuple[str, ...]] = {
    "run.resume": ("auto", "never"),
    "synthetic.preset": ("tiny", "demo", "full", "long"),
    "data.sample_mode": ("uniform", "fps"),
    "data.frame_codec": ("jpeg", "raw"),
    "model.preset": ("tiny", "tiny-p8", "ViT-B-32", "ViT-B-16"),
    "model.head": ("hvd", "meanp", "xpool", "eercf", "hvp", "hcmi"),
    "model.pfcm_scope": ("frame", "video"),
    "eval.mode": ("exhaustive", "two_stage"),
    "train.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def _rule(test: Callable[[Any], bool], text: str, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    """A range check; `optional`: None (take the preset's value) passes too."""
    return (lambda v: v is None or test(v), f"{text}, or unset") if optional else (test, text)


def _between(low: float, high: float, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    return _rule(lambda v: low <= v <= high, f"{low:,} to {high:,}", optional)


# Sizes get upper bounds far past any real run but short of what exhausts a machine by a typo.
MANY = 100_000_000  # videos, stills, steps
_COUNT = _between(1, MANY)
_NONNEGATIVE = _rule(lambda v: v >= 0, "at least 0")
_POSITIVE = _rule(lambda v: v > 0, "above 0")
_SHARE = _rule(lambda v: 0 < v <= 1, "in (0, 1]")
_CPUS = _rule(lambda v: 0 < v <= 1024, "above 0 and at most 1,024")
_WORKERS = _between(1, 4096)
_BATCH = _between(1, 65_536)
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "synthetic.num_train": _between(0, MANY, optional=True),
    "synthetic.num_val": _between(0, MANY, optional=True),
    "synthetic.num_test": _between(0, MANY, optional=True),
    "synthetic.frame_size": _rule(lambda v: 16 <= v <= 1024 and v % 2 == 0, "even and 16 to 1,024", optional=True),
    "synthetic.fps": _between(1, 240, optional=True),
    "synthetic.duration_s": _rule(lambda v: 0 < v <= 3600, "above 0 and at most 3,600", optional=True),
    "synthetic.event_fraction": _SHARE,
    "synthetic.entity_scale": _rule(lambda v: 0 < v <= 0.6, "in (0, 0.6]"),
    "synthetic.num_distractors": _rule(lambda v: 0 <= v <= 8, "0 to 8 (9 colours, one is the target's)"),
    "synthetic.train_captions": _between(1, 100),
    "synthetic.workers": _between(0, 4096),
    "data.num_frames": _between(1, 1024),
    "data.frame_size": _between(8, 1024),
    "data.jpeg_quality": _rule(lambda v: 1 <= v <= 100, "1 to 100"),
    "data.min_duration_fraction": _rule(lambda v: 0 <= v <= 1, "in [0, 1] (0 turns the check off)"),
    "data.max_words": _rule(lambda v: 3 <= v <= 77, "3 to 77 (start and end tokens take 2; CLIP reads 77)"),
    "data.decode_concurrency": _WORKERS,
    "data.decode_cpus": _CPUS,
    "data.decode_timeout_s": _rule(lambda v: 0 < v <= 86_400, "above 0 and at most a day (86,400)"),
    "data.decode_memory_mb": _between(1024, 1 << 20),
    "data.max_video_frames": _COUNT,
    "data.max_video_pixels": _between(1, 1 << 30),
    "data.max_video_duration_s": _rule(lambda v: 0 < v <= 7 * 86_400, "above 0 and at most a week (604,800)"),
    "data.shard_videos": _between(1, 1_000_000),
    "data.train_decode_cpus": _CPUS,
    "model.frame_keep": _SHARE,
    "model.pfcm_steps": _between(0, 16),
    "model.pfcm_ratio": _SHARE,
    "model.dpc_k": _between(1, 1024),
    "model.score_budget_mb": _between(1, 1 << 20),
    "model.temporal_layers": _between(1, 48),
    "model.pearson_weight": _NONNEGATIVE,
    "model.clip_ratio": _SHARE,
    "model.phrase_ratio": _SHARE,
    "pretrain.train_stills": _COUNT,
    "pretrain.val_stills": _COUNT,
    "pretrain.epochs": _between(1, 10_000),
    "pretrain.batch_size": _BATCH,
    "pretrain.lr": _POSITIVE,
    "train.num_workers": _WORKERS,
    "train.cpus_per_worker": _CPUS,
    "train.epochs": _between(1, 10_000),
    "train.batch_size": _BATCH,
    "train.lr": _POSITIVE,
    "train.backbone_lr": _NONNEGATIVE,
    "train.weight_decay": _NONNEGATIVE,
    "train.warmup_fraction": _rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.grad_clip": _POSITIVE,
    "train.max_skipped_steps": _between(1, 10_000),
    "train.checkpoint_every_steps": _between(0, MANY),
    "train.max_failures": _between(0, 1000),
    "eval.topk": _between(1, 100_000),
    "eval.batch_size": _BATCH,
    "eval.num_actors": _between(0, 4096),
    "index.ivf_from": _between(1, 1 << 40),
    "index.nprobe": _between(1, 1 << 20),
    "eval.explain_queries": _between(0, 100),
}
# Rules that tie two keys together: (key named in the error, test on the whole Config, what is wrong).
JOINT_RULES: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    (
        "train.batch_size",
        lambda c: c.train.batch_size % c.train.num_workers == 0,
        "must divide evenly over train.num_workers",
    ),
    (
        "eval.dsl",
        lambda c: not (c.eval.dsl and c.eval.mode == "two_stage" and not c.eval.compare),
        "needs every pair's score (a softmax over all queries), which eval.mode=two_stage never computes: "
        "use eval.mode=exhaustive, or add eval.compare=true for DSL on the exhaustive run",
    ),
)


def _not_finite(value: Any) -> bool:
    """A float (alone, or in a list or dict of them) that is NaN or infinite: no rule of ours admits one."""
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_not_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def check_values(values: dict[str, Any]) -> None:
    """Check `section.key -> value` pairs: every number finite, then CHOICES and RANGES; keys without a rule pass."""
    for key, value in values.items():
        if _not_finite(value):
            raise ConfigError(f"bad value for '{key}': {value!r} (must be a finite number)")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"bad value for '{key}': {value!r} (choose one of {', '.join(CHOICES[key])})")
        if key in RANGES and not RANGES[key][0](value):
            raise ConfigError(f"bad value for '{key}': {value!r} (must be {RANGES[key][1]})")


def check_section(section: str, values: Any) -> None:
    """Check one section's dataclass (e.g. `check_section("model", ModelConfig(...))`)."""
    check_values({f"{section}.{f.name}": getattr(values, f.name) for f in dataclasses.fields(values)})


def check(cfg: Config) -> None:
    """Every rule on a whole config: what load_config runs before any pipeline does work."""
    check_values(flatten(cfg))
    for key, test, text in JOINT_RULES:
        if not test(cfg):
            section, name = key.split(".")
            raise ConfigError(f"bad value for '{key}': {getattr(getattr(cfg, section), name)!r} ({text})")


# Keys naming a file or folder: a relative value is joined onto the project root (hvd.paths) when loaded.
PATH_KEYS = (
    "synthetic.out", "data.manifest", "data.shards", "model.pretrained", "pretrain.out", "train.storage_path",
    "eval.out", "eval.cache", "index.cache",
)


def _error_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return str(key) if key else "?"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = _error_key(err)
        raise ConfigError(f"{source}: unknown config key '{key}' (see --help for the valid keys)") from None
    except ValidationError as err:
        key = _error_key(err)
        raise ConfigError(f"{source}: bad value for '{key}': {err.msg.splitlines()[0]}") from None


def _resolve_paths(cfg: DictConfig) -> None:
    """Relative paths absolute under the project root, once, so every node and MLflow see the same path."""
    resolvers = {**dict.fromkeys(PATH_KEYS, resolve_path), "tracking.uri": resolve_tracking_uri}
    for key, resolve in resolvers.items():
        value = OmegaConf.select(cfg, key)
        if key == "model.pretrained" and value == WARM_START:
            continue
        if value is not None and (resolved := resolve(value)) != value:
            OmegaConf.update(cfg, key, resolved)


def load_config(
    config_files: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Defaults, then each YAML file in order (a later file over an earlier one), then `key=value`
    overrides, paths made absolute; every error names its key and file."""
    cfg = OmegaConf.structured(Config)
    files = [] if config_files is None else [config_files] if isinstance(config_files, str | Path) else config_files
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    return _finish(cfg)


# Keys that configs saved by earlier versions (checkpoints, registered models) may hold and that no longer
# mean anything: dropped when such a config is read back.
RETIRED_KEYS = ("data.decode_batch_size",)


def _interpolations(value: Any, key: str = "") -> list[str]:
    """Keys whose values hold `${...}` (an OmegaConf interpolation or resolver call such as `oc.env`)."""
    if isinstance(value, dict):
        return [found for name, item in value.items() for found in _interpolations(item, f"{key}{name}.")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _interpolations(item, f"{key}{index}.")]
    return [key.rstrip(".")] if isinstance(value, str) and "${" in value else []


def config_from_yaml(text: str) -> Config:
    """The inverse of `to_yaml`, checked like any loaded config.

    A stored config (a checkpoint's, a registered model's) is data: one holding an interpolation is
    refused, since resolving `${oc.env:NAME}` would copy the reader's environment (secrets included) into
    run params, names and paths. Only a user's own `--config` files and overrides resolve them."""
    saved = OmegaConf.create(text)
    if interpolated := _interpolations(OmegaConf.to_container(saved, resolve=False)):
        raise ConfigError(f"stored config holds interpolations at {', '.join(interpolated)}: refused, a stored "
                          "config is read as data and never resolves ${...}")
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        if section in saved and name in saved[section]:
            del saved[section][name]
    return _finish(_merge(OmegaConf.structured(Config), saved, "config YAML"))


def _finish(cfg: DictConfig) -> Config:
    _resolve_paths(cfg)
    config = OmegaConf.to_object(cfg)
    check(config)
    return config


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """`section.key -> value`, the form MLflow params take."""
    return {f"{section}.{key}": value for section, fields in to_dict(cfg).items() for key, value in fields.items()}


def describe(sections: tuple[str, ...]) -> str:
    """The `--help` text for the given sections: every key, its type and its default."""
    defaults = Config()
    lines = ["config keys (override with key=value; relative paths are under HVD_ROOT, else the cwd):"]
    for section in sections:
        obj = getattr(defaults, section)
        lines.append(f"  {section}:")
        for f in dataclasses.fields(obj):
            type_name = str(f.type).replace("typing.", "")
            lines.append(f"    {section}.{f.name}: {type_name} = {getattr(obj, f.name)!r}")
    return "\n".join(lines)


__all__ = [
    "CHOICES",
    "PATH_KEYS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "IndexConfig",
    "ModelConfig",
    "PretrainConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "WARM_START",
    "check",
    "check_section",
    "check_values",
    "config_from_yaml",
    "describe",
    "flatten",
    "load_config",
    "to_yaml",
]
