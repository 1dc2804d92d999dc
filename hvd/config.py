"""One structured config for every stage: YAML files in `configs/` plus `key=value` overrides.

The same `Config` object travels from the command line to data preparation, training, evaluation
and, flattened, into MLflow params, so a run is reproducible from what MLflow recorded. Its relative
paths are made absolute under the project root (`HVD_ROOT`, see `hvd.runtime.paths`) as it is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from hvd.errors import InputError
from hvd.runtime.paths import resolve_path, resolve_tracking_uri

WARM_START = "synthetic"  # model.pretrained: the preset's CLIP pretrained on synthetic stills (hvd.train.warm_start)


class ConfigError(InputError, ValueError):
    """A config key or value that cannot be used; the message names the key."""


Rule = tuple[Callable[[Any], bool], str]


def key(
    default: Any, help: str, *, choices: tuple[str, ...] = (), rule: Rule | None = None, path: bool = False,
    resume_free: bool = False,
) -> Any:
    """A config key with every fact about it in one place: its default, what it does (`--help`), its choices or
    range (checked at load), whether it names a file or folder (made absolute under the project root), and
    whether a resume may change it (it says how to run, not what is trained)."""
    facts = {"help": help, "choices": choices, "rule": rule, "path": path, "resume_free": resume_free}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=facts)
    return field(default=default, metadata=facts)


def _rule(test: Callable[[Any], bool], text: str, optional: bool = False) -> Rule:
    """A range check; `optional`: None (take the preset's value) passes too."""
    return (lambda v: v is None or test(v), f"{text}, or unset") if optional else (test, text)


def _between(low: float, high: float, optional: bool = False) -> Rule:
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
@dataclass
class RunConfig:
    name: str = key("hvd-tiny-demo", "run name in MLflow and Ray Train; reusing it resumes the run")
    seed: int = key(0, "seed of weight initialisation and data order")
    resume: str = key(
        "auto",
        "auto: an unfinished run of this name resumes if its config is this one; never: a new run",
        choices=("auto", "never"),
        resume_free=True,
    )


@dataclass
class SyntheticConfig:
    """The synthetic benchmark; `None` fields take the preset's value."""

    preset: str = key(
        "demo",
        "sizes of the generated benchmark (hvd.data.synthetic.PRESETS)",
        choices=("tiny", "demo", "full", "long"),
    )
    out: str = key(
        "data/synthetic-demo", "folder of the generated benchmark (videos and manifest)", path=True
    )
    seed: int = key(0, "seed of the generated world")
    num_train: int | None = key(None, "train videos", rule=_between(0, MANY, optional=True))
    num_val: int | None = key(None, "validation videos", rule=_between(0, MANY, optional=True))
    num_test: int | None = key(None, "test videos", rule=_between(0, MANY, optional=True))
    frame_size: int | None = key(
        None,
        "pixels, square frames",
        rule=_rule(lambda v: 16 <= v <= 1024 and v % 2 == 0, "even and 16 to 1,024", optional=True),
    )
    fps: int | None = key(
        None, "frames per second of the generated clips", rule=_between(1, 240, optional=True)
    )
    duration_s: float | None = key(
        None,
        "seconds per clip",
        rule=_rule(lambda v: 0 < v <= 3600, "above 0 and at most 3,600", optional=True),
    )
    event_fraction: float = key(0.5, "share of the clip in which the described event happens", rule=_SHARE)
    entity_scale: float = key(
        0.3,
        "target object size relative to the frame side",
        rule=_rule(lambda v: 0 < v <= 0.6, "in (0, 0.6]"),
    )
    num_distractors: int = key(
        2,
        "objects besides the target in each clip",
        rule=_rule(lambda v: 0 <= v <= 8, "0 to 8 (9 colours, one is the target's)"),
    )
    train_captions: int = key(5, "captions per train video; val/test videos get one", rule=_between(1, 100))
    temporal: bool = key(
        False, "the target moves and captions name the motion (order matters: temporal heads)"
    )
    workers: int = key(0, "generator processes; 0 = one per CPU", rule=_between(0, 4096))


@dataclass
class DataConfig:
    manifest: str | None = key(None, "benchmark manifest (JSONL); the synthetic one when None", path=True)
    shards: str = key("data/shards-demo", "Parquet shard directory written by prepare", path=True)
    overwrite: bool = key(False, "replace shards prepared with other settings", resume_free=True)
    num_frames: int = key(12, "frames sampled per video", rule=_between(1, 1024))
    sample_mode: str = key(
        "uniform",
        "uniform: evenly over the clip; fps: one frame a second, padded when the clip is shorter",
        choices=("uniform", "fps"),
    )
    frame_size: int = key(64, "short side resize, then centre crop to a square", rule=_between(8, 1024))
    frame_codec: str = key("jpeg", "how frames are stored in the shards", choices=("jpeg", "raw"))
    decoder: str = key(
        "auto",
        "what reads the videos in prepare: decord, or pyav (PyAV's wheels ship their own FFmpeg); auto: decord "
        "where it imports, else pyav. Both give the same frames (docs/data.md), so a change re-prepares nothing",
        choices=("auto", "decord", "pyav"),
        resume_free=True,
    )
    jpeg_quality: int = key(
        90, "JPEG quality of stored frames", rule=_rule(lambda v: 1 <= v <= 100, "1 to 100")
    )
    min_duration_fraction: float = key(
        0.9,
        "decodable frames must cover this share of the declared duration",
        rule=_rule(lambda v: 0 <= v <= 1, "in [0, 1] (0 turns the check off)"),
    )
    keep_truncated: bool = key(False, "keep (flagged) instead of quarantining a clip that covers less")
    max_words: int = key(
        32,
        "caption tokens, including start and end tokens",
        rule=_rule(lambda v: 3 <= v <= 512, "3 to 512 (start and end tokens take 2; the preset's context caps it)"),
    )
    expand_captions: bool = key(
        False,
        "train every caption once an epoch (a pass over the videos per caption), instead of one random caption a video",
    )
    augment: str = key(
        "none",
        "training-time augmentation on the CPU input workers, one draw per clip (its frames alike), never in "
        "evaluation: crop_flip (X-Pool's random resized crop, scale 0.5-1, and horizontal flip; it mirrors "
        "'left' and 'right'), randaugment (2 RandAugment ops at magnitude 9)",
        choices=("none", "crop_flip", "randaugment"),
    )
    decode_concurrency: int = key(2, "decode tasks running at once", rule=_WORKERS)
    decode_cpus: float = key(1.0, "CPUs reserved by each decode task", rule=_CPUS)
    decode_timeout_s: float = key(
        120.0,
        "a video still decoding after this is stopped and quarantined (timeout)",
        rule=_rule(lambda v: 0 < v <= 86_400, "above 0 and at most a day (86,400)"),
    )
    decode_memory_mb: int = key(
        4096,
        "address-space limit of each decode child; a video that needs more is quarantined",
        rule=_between(1024, 1 << 20),
    )
    max_video_frames: int = key(
        1_000_000, "a video declaring more frames is quarantined (too_large) before decoding", rule=_COUNT
    )
    max_video_pixels: int = key(
        4096 * 4096, "width x height; larger frames are quarantined (too_large)", rule=_between(1, 1 << 30)
    )
    max_video_duration_s: float = key(
        6 * 3600.0,
        "longer videos are quarantined (too_large)",
        rule=_rule(lambda v: 0 < v <= 7 * 86_400, "above 0 and at most a week (604,800)"),
    )
    shard_videos: int = key(
        256,
        "at most this many videos per decode task, so per Parquet shard file",
        rule=_between(1, 1_000_000),
    )
    decode_resources: dict[str, float] = key({}, "custom Ray resources per decode task")
    train_decode_cpus: float = key(
        0.5, "CPUs per Ray Data task that decodes and tokenises training batches", rule=_CPUS
    )
    next_epoch_lead: int = key(
        8,
        "batches before an epoch's end at which the next epoch's Ray Data execution starts, so it is ready when "
        "the epoch ends (the epochs take turns over two copies of the train split: a split serves one epoch at a "
        "time); 0: it starts when the epoch is read",
        rule=_between(0, 1_000_000),
        resume_free=True,
    )


def _dpc_k() -> Any:
    return key(3, "DPC-KNN neighbours, the token itself included", rule=_between(1, 1024))


def _temporal_layers() -> Any:
    return key(4, "blocks of the transformer over frames (CLIP4Clip's seqTransf)", rule=_between(1, 48))


@dataclass
class PFCMKeys:
    """Density-peak patch compression, shared by the heads that cluster patches (HVD, HVP-Net)."""

    pfcm_steps: int = key(3, "PFCM: rounds of density-peak compression", rule=_between(0, 16))
    pfcm_ratio: float = key(0.5, "PFCM: share of tokens kept per round", rule=_SHARE)
    dpc_k: int = _dpc_k()


@dataclass
class HVDHeadConfig(PFCMKeys):
    frame_keep: float = key(0.5, "FFSM: share of frames kept per (text, video) pair (frame_select=share)", rule=_SHARE)
    frame_select: str = key(
        "share",
        "FFSM's rule: the frame_keep share of each video's frames most similar to the caption (share, the paper's), "
        "every frame at least as similar as the video's mean frame (above_mean), or every frame within frame_margin "
        "of the most similar one's cosine (near_best): the last two keep as many frames as match the caption",
        choices=("share", "above_mean", "near_best"),
    )
    frame_margin: float = key(0.1, "FFSM with frame_select=near_best: cosine margin below the best frame",
                              rule=_NONNEGATIVE)
    pfcm_scope: str = key(
        "video",
        "what PFCM clusters: per (caption, video) pair the patches of the frames FFSM kept (pair, the paper's "
        "order), once per video all its patches together (video) or each frame's alone (frame)",
        choices=("frame", "video", "pair"),
    )


@dataclass
class HVPHeadConfig(PFCMKeys):
    layers: list[int] = key(
        [], "ViT blocks matched with the caption; empty: first, (depth - 1) // 2, last (ViT-B: 0, 5, 11, as HVP-Net)"
    )
    word_weights: str = key(
        "raw",
        "word-patch matching weighs each word by its weighting network's raw output (raw, as HVP-Net) or by a "
        "softmax of it over the caption (softmax)",
        choices=("raw", "softmax"),
    )


@dataclass
class XPoolHeadConfig:
    dropout: float = key(
        0.3, "dropout on the residual projection after pooling, in training (X-Pool's transformer_dropout)",
        rule=_rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    )


@dataclass
class EERCFHeadConfig:
    temporal_layers: int = _temporal_layers()
    pearson_weight: float = key(0.001, "weight of the Pearson constraint in the loss (EERCF's)", rule=_NONNEGATIVE)


@dataclass
class HCMIHeadConfig:
    temporal_layers: int = _temporal_layers()
    dpc_k: int = _dpc_k()
    clip_ratio: float = key(0.25, "clips per real frame (12 frames -> 3 clips)", rule=_SHARE)
    phrase_ratio: float = key(0.25, "phrases per word token", rule=_SHARE)
    label_denoising: bool = key(True, "soft InfoNCE targets shared with near-duplicate captions of the batch")
    sample_enhancement: bool = key(True, "negatives near the positive's score count twice in the InfoNCE")


@dataclass(frozen=True)
class HeadSpec:
    """A similarity head: the class that builds it (`module:Class`, imported by `hvd.model.factory` only when
    built, so configs load without torch) and whether it runs a transformer over frames seeded from CLIP's text
    tower (one position per frame). Its knobs, if any, are `ModelConfig`'s section of the head's name."""

    builder: str
    frame_transformer: bool = False


# The one list of heads: `model.head`'s choices, the factory and the docs read it.
HEADS: dict[str, HeadSpec] = {
    "hvd": HeadSpec("hvd.model.heads.hvd:HVDHead"),
    "meanp": HeadSpec("hvd.model.heads.meanp:MeanPoolHead"),
    "xpool": HeadSpec("hvd.model.heads.xpool:XPoolHead"),
    "eercf": HeadSpec("hvd.model.heads.eercf:EERCFHead", frame_transformer=True),
    "hvp": HeadSpec("hvd.model.heads.hvp:HVPHead"),
    "hcmi": HeadSpec("hvd.model.heads.hcmi:HCMIHead", frame_transformer=True),
}


@dataclass
class FirstStageConfig:
    """The cheap global embeddings a gallery index stores, trained with the head (`hvd.model.first_stage`)."""

    weight: float = key(
        0.0, "weight of the first stage's loss term; 0: untrained, the head's own sentence and mean-frame embeddings",
        rule=_NONNEGATIVE,
    )
    distill: float = key(
        0.5, "share of that term spent on ranking like the full score (the rest: its own InfoNCE)",
        rule=_between(0, 1),
    )


@dataclass
class ModelConfig:
    preset: str = key(
        "tiny", "CLIP backbone (tiny ones for CPUs)", choices=("tiny", "tiny-p8", "ViT-B-32", "ViT-B-16")
    )
    head: str = key("hvd", "similarity head (docs/heads.md)", choices=tuple(HEADS))
    pretrained: str | None = key(
        None, "local CLIP checkpoint file (nothing is downloaded); synthetic: the warm start", path=True
    )
    quick_gelu: bool = key(True, "OpenAI CLIP weights use QuickGELU; most LAION open_clip weights do not")
    score_budget_mb: int = key(512, "memory cap for one chunk of pairwise scoring", rule=_between(1, 1 << 20))
    # One section per head with knobs, named as the head; only the chosen head's section is read.
    hvd: HVDHeadConfig = field(default_factory=HVDHeadConfig)
    xpool: XPoolHeadConfig = field(default_factory=XPoolHeadConfig)
    hvp: HVPHeadConfig = field(default_factory=HVPHeadConfig)
    eercf: EERCFHeadConfig = field(default_factory=EERCFHeadConfig)
    hcmi: HCMIHeadConfig = field(default_factory=HCMIHeadConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)

    def head_config(self) -> Any:
        """The chosen head's section, None for a head without knobs."""
        return getattr(self, self.head, None)


@dataclass
class PretrainConfig:
    """`model.pretrained=synthetic`: the preset's CLIP trained image-text on stills of the synthetic world first
    (pipelines/pretrain.py), cached by fingerprint under `out` and registered in MLflow as clip-<preset>-synthetic."""

    train_stills: int = key(20000, "captioned stills to train on", rule=_COUNT)
    val_stills: int = key(500, "held-out stills for validation", rule=_COUNT)
    epochs: int = key(3, "epochs over the stills", rule=_between(1, 10_000))
    batch_size: int = key(128, "global batch", rule=_BATCH)
    lr: float = key(
        5e-4,
        "AdamW learning rate (1e-3 and 2e-3 learn the stills more slowly in three epochs: docs/benchmarks.md)",
        rule=_POSITIVE,
    )
    seed: int = key(
        0,
        "seed of the warm start's initialisation and batch order; the stills themselves are synthetic.seed's",
        rule=_between(0, 2**32 - 1),
    )
    out: str = key("data/pretrained", "where warm starts are cached, by fingerprint", path=True)


@dataclass
class TrainConfig:
    num_workers: int = key(2, "Ray Train workers (one per GPU with train.use_gpu)", rule=_WORKERS)
    use_gpu: bool = key(False, "train on GPUs (NCCL) instead of CPUs (gloo)")
    cpus_per_worker: float = key(0.5, "CPUs reserved by each training worker", rule=_CPUS)
    epochs: int = key(5, "passes over the training split", rule=_between(1, 10_000))
    batch_size: int = key(32, "global batch, split across workers", rule=_BATCH)
    lr: float = key(
        1e-3, "new modules, and the backbone when training from scratch (the tiny demo)", rule=_POSITIVE
    )
    backbone_lr: float = key(
        2e-4,
        "a pretrained backbone (the tiny warm start; real CLIP: 1e-7); from scratch it uses `lr`",
        rule=_NONNEGATIVE,
    )
    weight_decay: float = key(0.2, "AdamW weight decay", rule=_NONNEGATIVE)
    warmup_fraction: float = key(
        0.1,
        "share of steps of linear warmup before cosine decay",
        rule=_rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    grad_clip: float = key(1.0, "gradient norm clip", rule=_POSITIVE)
    precision: str = key(
        "bf16",
        "the encoders on CUDA: bf16 autocast, fp16 autocast with a gradient scaler, or fp32; CPU trains in fp32",
        choices=("bf16", "fp16", "fp32"),
    )
    grad_checkpointing: bool = key(
        False,
        "recompute the vision tower's blocks in backward: less activation memory for more compute",
        resume_free=True,
    )
    micro_batch_size: int = key(
        0,
        "encode each worker's batch this many rows at a time with cached feature gradients: the whole batch's "
        "loss and gradient in a micro-batch's activation memory (0: the whole batch in one pass)",
        rule=_between(0, 1_000_000),
        resume_free=True,
    )
    max_skipped_steps: int = key(
        5,
        "steps in a row with a non-finite loss or gradient (skipped) before the run stops",
        rule=_between(1, 10_000),
    )
    checkpoint_every_steps: int = key(
        20,
        "also checkpoint every N steps (0 = only at epoch ends): what a restart redoes",
        rule=_between(0, MANY),
    )
    max_failures: int = key(
        2, "worker group restarts from the last checkpoint before the run fails", rule=_between(0, 1000)
    )
    storage_path: str = key(
        "runs/ray", "Ray Train's checkpoints and run state (a folder or a URI)", path=True
    )
    fail_at_step: int = key(-1, "test-only fault injection: a worker exits at this global step")
    placement_strategy: str = key(
        "PACK", "how workers spread over nodes", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    worker_resources: dict[str, float] = key({}, "custom Ray resources per worker")


@dataclass
class EvalConfig:
    mode: str = key(
        "exhaustive",
        "exhaustive: every pair through the full model; two_stage: rescore the top-k of a global-embedding search",
        choices=("exhaustive", "two_stage"),
    )
    topk: int = key(
        50,
        "two_stage: candidates per query that stage 2 rescores with the full model",
        rule=_between(1, 100_000),
    )
    shortlist: int = key(
        0,
        "two_stage: stage 1's best candidates per caption re-ranked by their frames (the mean cosine of each "
        "video's eval.top_frames frames most like the caption) before stage 2 takes the top-k; 0: off",
        rule=_between(0, 1_000_000),
    )
    top_frames: int = key(3, "eval.shortlist: frames per video whose cosines with the caption are averaged",
                          rule=_between(1, 1024))
    dsl: bool = key(False, "also report dual-softmax (dsl_) metrics; needs every pair's score (exhaustive)")
    compare: bool = key(False, "two_stage: also run exhaustive and report it beside")
    batch_size: int = key(64, "videos (and captions) encoded per batch", rule=_BATCH)
    split: str = key("test", "which split of the benchmark to evaluate")
    benchmark: str | None = key(
        None, "MLflow experiment eval/<benchmark>; default: the manifest's folder name"
    )
    out: str = key(
        "runs/eval", "JSON report and pictures go to <out>/<benchmark>/<model>-v<version>/", path=True
    )
    cache: str = key(
        "data/eval-shards", "where --manifest benchmarks are prepared (reused when unchanged)", path=True
    )
    num_actors: int = key(
        0, "encoding actors; 0 = one per GPU, or one CPU actor without GPUs", rule=_between(0, 4096)
    )
    explain_queries: int = key(
        3,
        "queries drawn with what the head weighed each frame by (hvd: FFSM, PFCM clusters)",
        rule=_between(0, 100),
    )
    mechanism_videos: int = key(
        1000,
        "videos of the split whose recorded ground truth (event frames, target boxes) the head's frame choice and "
        "entities are scored against; 0: none",
        rule=_between(0, 10_000_000),
    )


@dataclass
class IndexConfig:
    ivf_from: int = key(
        100_000,
        "galleries of at least this many videos get an IVF index (approximate); smaller: flat, exact",
        rule=_between(1, 1 << 40),
    )
    nprobe: int = key(
        32,
        "IVF: inverted lists searched per query (more: nearer exact search, slower)",
        rule=_between(1, 1 << 20),
    )
    use: bool = key(
        True, "eval.mode=two_stage reuses the model version's index of the benchmark when one matches"
    )
    cache: str = key(
        "data/indexes",
        "indexes downloaded from MLflow (and built here) are kept under <cache>/<run id>",
        path=True,
    )


@dataclass
class ServeConfig:
    """`pipelines/serve.py`: caption search over HTTP as a Ray Serve application."""

    host: str = key(
        "127.0.0.1", "address Serve's HTTP proxies listen on; anything but loopback needs a token (serve.token_env)"
    )
    port: int = key(8000, "port Serve's HTTP proxies listen on", rule=_between(1, 65_535))
    replicas: int = key(1, "replicas of the search deployment, each holding the model and the index", rule=_WORKERS)
    replica_cpus: float = key(1.0, "CPUs reserved by each replica (its torch threads)", rule=_CPUS)
    max_batch_size: int = key(
        16,
        "captions a replica ranks in one pass, gathered from concurrent requests; also the most one request may send",
        rule=_between(1, 1024),
    )
    batch_wait_timeout_s: float = key(
        0.01,
        "how long a replica waits for more captions before ranking those it has",
        rule=_rule(lambda v: 0 <= v <= 10, "0 to 10"),
    )
    token_env: str = key(
        "HVD_SERVE_TOKEN",
        "environment variable holding the bearer token that every request but /health must carry (unset: none)",
    )


@dataclass
class TrackingConfig:
    uri: str | None = key(
        None, "MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db under the project root"
    )
    experiment: str = key("hvd", "MLflow experiment of training runs")
    model_name: str = key("hvd", "registered model name")


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
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _leaves(values: Any, prefix: str) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(`section.key`, its declaration, its value) for every key under a config dataclass, head sections too."""
    for item in dataclasses.fields(values):
        value = getattr(values, item.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item, value


# Every table below is read off the keys' own declarations (`key`): load_config checks a whole Config, and
# the library checks the pieces it is handed directly (`check_values`), both from them.
KEYS: dict[str, dataclasses.Field] = {name: item for name, item, _ in _leaves(Config(), "")}
CHOICES: dict[str, tuple[str, ...]] = {name: f.metadata["choices"] for name, f in KEYS.items() if f.metadata["choices"]}
RANGES: dict[str, Rule] = {name: f.metadata["rule"] for name, f in KEYS.items() if f.metadata["rule"]}
PATH_KEYS: tuple[str, ...] = tuple(name for name, f in KEYS.items() if f.metadata["path"])
RESUME_FREE_KEYS: frozenset[str] = frozenset(name for name, f in KEYS.items() if f.metadata["resume_free"])


# Rules that tie two keys together: (key named in the error, test on the whole Config, what is wrong).
JOINT_RULES: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    (
        "train.batch_size",
        lambda c: c.train.batch_size % c.train.num_workers == 0,
        "must divide evenly over train.num_workers",
    ),
    (
        "train.micro_batch_size",
        lambda c: c.train.micro_batch_size < c.train.batch_size // c.train.num_workers,
        "must be below each worker's batch (train.batch_size / train.num_workers), or 0 for one pass",
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


def replace_keys(values: Any, changes: dict[str, Any]) -> Any:
    """A config dataclass (a whole `Config` or a section) with dotted keys under it set, e.g.
    `replace_keys(model, {"head": "hcmi", "hcmi.label_denoising": False})`; sections it changes are copies."""
    direct = {name: value for name, value in changes.items() if "." not in name}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        if "." in name:
            section, _, rest = name.partition(".")
            nested.setdefault(section, {})[rest] = value
    sections = {name: replace_keys(getattr(values, name), inner) for name, inner in nested.items()}
    return dataclasses.replace(values, **direct, **sections)


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
    check_values({name: value for name, _, value in _leaves(values, f"{section}.")})


def check(cfg: Config) -> None:
    """Every rule on a whole config: what load_config runs before any pipeline does work."""
    check_values(flatten(cfg))
    for key, test, text in JOINT_RULES:
        if not test(cfg):
            section, name = key.split(".")
            raise ConfigError(f"bad value for '{key}': {getattr(getattr(cfg, section), name)!r} ({text})")


def _error_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return str(key) if key else "?"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        key = _error_key(err)
        hint = f"now {' and '.join(moved)}" if (moved := moved_to(key)) else "see --help for the valid keys"
        raise ConfigError(f"{source}: unknown config key '{key}' ({hint})") from None
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


def moved_to(old: str) -> list[str]:
    """Where a key of the earlier flat model section lives now: `model.frame_keep` -> `model.hvd.frame_keep`,
    and into every head section that has the name (the one value applied to every head then)."""
    section, _, name = old.rpartition(".")
    return [new for new in KEYS if new.rpartition(".")[0].rpartition(".")[0] == section and new.endswith(f".{name}")]


def upgrade_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`section.key -> value` pairs recorded by an earlier version (MLflow params), under today's names."""
    upgraded = {key: value for key, value in values.items() if key in KEYS or not moved_to(key)}
    for old in values.keys() - upgraded.keys():
        for new in moved_to(old):
            upgraded.setdefault(new, values[old])
    return upgraded


def _upgrade(saved: DictConfig) -> None:
    """A stored config of an earlier version under today's names, in place: retired keys dropped, moved ones moved."""
    for retired in RETIRED_KEYS:
        section, name = retired.split(".")
        if section in saved and name in saved[section]:
            del saved[section][name]
    for section in [s for s in saved if isinstance(saved[s], DictConfig)]:
        for name in list(saved[section]):
            old = f"{section}.{name}"
            if old not in KEYS and (targets := moved_to(old)):
                for new in targets:
                    if OmegaConf.select(saved, new) is None:
                        OmegaConf.update(saved, new, saved[section][name], force_add=True)
                del saved[section][name]


def _interpolations(value: Any, prefix: str = "") -> list[str]:
    """Keys whose values hold `${...}` (an OmegaConf interpolation or resolver call such as `oc.env`)."""
    if isinstance(value, dict):
        return [found for name, item in value.items() for found in _interpolations(item, f"{prefix}{name}.")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _interpolations(item, f"{prefix}{index}.")]
    return [prefix.rstrip(".")] if isinstance(value, str) and "${" in value else []


def config_from_yaml(text: str) -> Config:
    """The inverse of `to_yaml`, checked like any loaded config.

    A stored config (a checkpoint's, a registered model's) is data: one holding an interpolation is
    refused, since resolving `${oc.env:NAME}` would copy the reader's environment (secrets included) into
    run params, names and paths. Only a user's own `--config` files and overrides resolve them."""
    saved = OmegaConf.create(text)
    if interpolated := _interpolations(OmegaConf.to_container(saved, resolve=False)):
        raise ConfigError(f"stored config holds interpolations at {', '.join(interpolated)}: refused, a stored "
                          "config is read as data and never resolves ${...}")
    _upgrade(saved)
    return _finish(_merge(OmegaConf.structured(Config), saved, "config YAML"))


def _finish(cfg: DictConfig) -> Config:
    _resolve_paths(cfg)
    config = OmegaConf.to_object(cfg)
    check(config)
    return config


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Config) -> dict[str, Any]:
    """`section.key -> value`, the form MLflow params take."""
    return {name: value for name, _, value in _leaves(cfg, "")}


def describe(sections: tuple[str, ...]) -> str:
    """The `--help` text for the given sections: every key with its type, default, what it does and what it
    may be, read off its declaration."""
    defaults = Config()
    lines = ["config keys (override with key=value; relative paths are under HVD_ROOT, else the cwd):"]
    group = None
    for section in sections:
        for name, item, value in _leaves(getattr(defaults, section), f"{section}."):
            if (parent := name.rpartition(".")[0]) != group:
                group = parent
                lines.append(f"  {group}:")
            facts = item.metadata
            type_name = str(item.type).replace("typing.", "")
            allowed = f"one of {', '.join(facts['choices'])}" if facts["choices"] else RANGES.get(name, (0, ""))[1]
            lines.append(f"    {name}: {type_name} = {value!r}")
            lines.append(f"        {facts['help']}" + (f" ({allowed})" if allowed else ""))
    return "\n".join(lines)


__all__ = [
    "CHOICES",
    "KEYS",
    "PATH_KEYS",
    "RANGES",
    "RESUME_FREE_KEYS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EERCFHeadConfig",
    "HCMIHeadConfig",
    "HEADS",
    "HVDHeadConfig",
    "HVPHeadConfig",
    "XPoolHeadConfig",
    "HeadSpec",
    "EvalConfig",
    "IndexConfig",
    "ModelConfig",
    "PretrainConfig",
    "RunConfig",
    "ServeConfig",
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
    "moved_to",
    "replace_keys",
    "to_yaml",
    "upgrade_keys",
]
