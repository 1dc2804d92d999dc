"""The benchmark x head recipes (configs/benchmarks/, configs/heads/): every combination loads, alone and
after configs/cluster.yaml, resolves to the values its reference's recipe uses, fits the model, and names
its source and the number it should reproduce."""

import re
from pathlib import Path

import pytest

from hvd.config import HEADS, load_config
from hvd.model.presets import check_inputs

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "configs" / "benchmarks"
HEAD_FILES = ROOT / "configs" / "heads"

# benchmark: (num_frames, max_words, expand_captions, epochs, batch_size, checkpoint_every_steps)
RECIPES = {
    "msrvtt": (12, 24, True, 5, 32, 500),  # HVP-Net's run_MSRVTT.sh
    "msvd": (12, 32, True, 5, 32, 250),  # CLIP4Clip's MSVD command
    "lsmdc": (12, 24, True, 5, 32, 500),  # HVP-Net's run_LSMDC.sh
    "vatex": (12, 24, True, 5, 32, 500),  # HVP-Net's defaults (no VATEX script found)
    "didemo": (64, 64, False, 5, 32, 50),  # CLIP4Clip's DiDeMo command: paragraphs, the long-video setting
    "activitynet": (64, 64, False, 5, 32, 50),  # CLIP4Clip's and HBI's ActivityNet commands
}
# head: (lr, backbone_lr); the reference's where it differs from the benchmark files' 1e-4 / 1e-7
LEARNING_RATES = {
    "hvd": (1e-4, 1e-7),
    "meanp": (1e-4, 1e-7),
    "xpool": (3e-5, 1e-6),  # X-Pool's noclip_lr (MSR-VTT 9k) and clip_lr
    "eercf": (1e-4, 1e-7),
    "hvp": (1e-4, 1e-7),
    "hcmi": (1e-4, 1e-7),
}
# The published t2v R@1 (ViT-B/32) each file's header must name; None: not found, and the header says so.
TARGETS = {
    "msrvtt": "46.9", "msvd": "47.2", "lsmdc": "25.2", "vatex": None, "didemo": "43.4", "activitynet": "40.5",
    "hvd": None, "meanp": "43.4", "xpool": "46.9", "eercf": None, "hvp": None, "hcmi": None,
}
COMBINATIONS = [(b, h) for b in RECIPES for h in LEARNING_RATES]


def test_every_recipe_file_is_in_the_table():
    assert {p.stem for p in BENCHMARKS.glob("*.yaml")} == set(RECIPES)
    assert {p.stem for p in HEAD_FILES.glob("*.yaml")} == set(LEARNING_RATES) == set(HEADS)


@pytest.mark.parametrize("cluster", [False, True], ids=["alone", "after-cluster"])
@pytest.mark.parametrize("benchmark,head", COMBINATIONS)
def test_a_combination_resolves_to_its_reference_recipe(benchmark, head, cluster, monkeypatch):
    monkeypatch.setenv("HVD_BUCKET", "s3://test-bucket/hvd")
    files = [BENCHMARKS / f"{benchmark}.yaml", HEAD_FILES / f"{head}.yaml"]
    cfg = load_config([ROOT / "configs" / "cluster.yaml", *files] if cluster else files, [])
    check_inputs(cfg.model, cfg.data)  # frames at the preset's size, a frame transformer's positions
    frames, words, expand, epochs, batch, every = RECIPES[benchmark]
    assert (cfg.data.num_frames, cfg.data.max_words, cfg.data.expand_captions) == (frames, words, expand)
    assert (cfg.data.frame_size, cfg.data.sample_mode, cfg.model.preset) == (224, "fps", "ViT-B-32")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.checkpoint_every_steps) == (epochs, batch, every)
    assert (cfg.train.lr, cfg.train.backbone_lr) == LEARNING_RATES[head]
    assert (cfg.train.use_gpu, cfg.train.warmup_fraction, cfg.model.head) == (True, 0.1, head)
    assert cfg.model.pretrained.endswith("weights/ViT-B-32.pt")
    assert cfg.data.manifest.endswith(f"data/{benchmark}/manifest.jsonl")
    assert cfg.data.shards.endswith(f"data/{benchmark}/shards")  # the recipe's, over the cluster's demo shards
    assert (cfg.tracking.experiment, cfg.tracking.model_name) == (benchmark, f"{head}-{benchmark}")
    assert cfg.run.name == f"{head}-vitb32-{benchmark}"
    if cluster:
        assert cfg.train.storage_path == "s3://test-bucket/hvd/checkpoints"
        assert cfg.data.decode_resources == {"cpu_node": 0.001}


def test_the_msrvtt_hvd_combination_is_the_readme_recipe():
    """configs/vit_b32_msrvtt.yaml (the README's cluster command) is benchmarks/msrvtt.yaml + heads/hvd.yaml."""
    composed = load_config([BENCHMARKS / "msrvtt.yaml", HEAD_FILES / "hvd.yaml"], [])
    assert composed == load_config([ROOT / "configs" / "vit_b32_msrvtt.yaml"], [])


@pytest.mark.parametrize("path", sorted([*BENCHMARKS.glob("*.yaml"), *HEAD_FILES.glob("*.yaml")]), ids=lambda p: p.stem)
def test_a_recipe_names_its_source_and_the_number_to_reproduce(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"^# Source: \S", header, re.M), f"{path.name}: no '# Source:' line"
    reproduces = re.search(r"^# Reproduces\b(.*(?:\n#   .*)*)", header, re.M)
    assert reproduces, f"{path.name}: no '# Reproduces' line"
    target = TARGETS[path.stem]
    if target is None:
        assert "not found" in reproduces.group(1) or "not retrieved" in reproduces.group(1)
    else:
        assert re.search(rf"\b{re.escape(target)}\b", reproduces.group(1)), f"{path.name}: {target} not named"
    assert "docs/reproducing.md" in header or target is not None
