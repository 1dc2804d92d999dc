"""Smoke run of the retrieval-speed harness (benchmarks/retrieval_speed.py) on a tiny random model: the
spliced gallery it builds and both of its measurement paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hvd.config import IndexConfig, ModelConfig
from hvd.gallery import ivf_lists
from hvd.model import build_model, build_tokenizer

_SPEC = importlib.util.spec_from_file_location(
    "retrieval_speed", Path(__file__).parents[1] / "benchmarks" / "retrieval_speed.py"
)
retrieval_speed = sys.modules["retrieval_speed"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(retrieval_speed)


@pytest.fixture(scope="module")
def real():
    """A random tiny HVD model, 16 'real' videos of random frames and one caption each."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg).eval()
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "white") for s in ("circle", "square", "bar", "cross")]
    with torch.no_grad():
        text = model.encode_text(build_tokenizer(cfg, max_words=16)(captions))
        video = model.encode_video(torch.randn(16, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return model, text, video, torch.arange(16)


def test_spliced_gallery_keeps_the_real_videos_and_splices_two_of_them_per_distractor(real):
    _, _, video, _ = real
    gallery = retrieval_speed.SplicedGallery.of_size(video, 200, seed=3)
    assert len(gallery) == 200
    first, entities = gallery.rows(torch.arange(16)), video.patches.shape[1]
    for name in ("frames", "frame_mask", "frame_views"):
        assert torch.equal(getattr(first, name), getattr(video, name))
    assert torch.equal(first.patches[:, :entities], video.patches)  # a real video's entities, then empty slots
    assert torch.equal(first.patch_frames[:, :entities], video.patch_frames) and not first.patch_frames[:, entities:].any()
    rows = torch.tensor([150, 16, 199])
    spliced = gallery.rows(rows)
    for i, row in enumerate(rows.tolist()):
        a, b, s = (int(t[row - 16]) for t in (gallery.first, gallery.second, gallery.cut))
        assert a != b and 1 <= s < 4
        assert torch.equal(spliced.frames[i, :s], video.frames[a, :s]) and torch.equal(spliced.frames[i, s:], video.frames[b, s:])
        # each video's entities on its own side of the cut: every frame is still covered by an entity
        assert not spliced.patch_frames[i, :entities, s:].any() and not spliced.patch_frames[i, entities:, :s].any()
        assert spliced.patch_frames[i].any(dim=0).all()
    whole = gallery.materialize(chunk=64)  # chunked reads agree with row reads
    assert torch.equal(whole.frames[rows], spliced.frames) and torch.equal(whole.patches[rows], spliced.patches)


def test_spliced_rows_keep_each_blocks_entities_in_that_blocks_segment():
    """HVP-Net's entities are one segment per ViT block: a spliced row puts both videos' segments side by side
    block by block, so each block reads its own entities of both videos (not the next block's)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(head="hvp")).eval()
    blocks = len(model.head.vision_layers)
    with torch.no_grad():
        video = model.encode_video(torch.randn(6, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    gallery = retrieval_speed.SplicedGallery.of_size(video, 20, seed=3, blocks=blocks)
    spliced, per_block = gallery.rows(torch.tensor([10])), video.patches.shape[1] // blocks
    a, b = int(gallery.first[4]), int(gallery.second[4])
    for block, segment in enumerate(spliced.patches[0].split(2 * per_block)):
        own = slice(block * per_block, (block + 1) * per_block)
        assert torch.equal(segment[:per_block], video.patches[a, own]) and torch.equal(segment[per_block:], video.patches[b, own])
    with torch.no_grad():  # and the head scores the row
        assert model.score(model.encode_text(torch.tensor([[49406, 320, 49407]])), spliced).isfinite().all()


def test_both_measurement_paths_report_consistent_numbers(real, capsys):
    model, text, video, truth = real
    torch.set_grad_enabled(False)
    try:
        gallery = retrieval_speed.SplicedGallery.of_size(video, 400)
        small, framed = retrieval_speed.measure_in_memory(model, text, truth, gallery.materialize(), topk=400, repeats=1,
                                                          shortlists=(0, 400))
        assert small["two_stage_R1"] == small["exhaustive_R1"]  # top-k of everything: the same ranking
        assert framed["shortlist"] == 0 and framed["exhaustive_ms"] == small["exhaustive_ms"]  # no longer than top-k: off
        few = retrieval_speed.measure_in_memory(model, text, truth, gallery.materialize(), topk=5, repeats=1,
                                                shortlists=(0, 50), top_frames=2)
        assert [row["shortlist"] for row in few] == [0, 50] and few[0]["exhaustive_ms"] == few[1]["exhaustive_ms"]
        for k in (50, 100):  # the frames re-order the mean frame's top 50 among themselves; below them, as before
            assert few[0][f"stage1/gt_R{k}"] == few[1][f"stage1/gt_R{k}"]
        # every IVF list probed: the index finds the exact top-k, so both two-stage variants agree
        every_list = IndexConfig(ivf_from=100, nprobe=ivf_lists(400))
        large = retrieval_speed.measure_at_scale(model, text, truth, gallery, 20, every_list, exhaustive_queries=6, chunk=128)
        assert large["index"] == "ivf" and large["ann_recall_at_k"] == 100.0
        assert large["two_stage_R1"] == large["exact_two_stage_R1"] and large["exhaustive_queries"] == 6
        assert large["features_GiB"] > 0 and large["index_MiB"] > 0 and large["speedup"] > 0
        few_lists = retrieval_speed.measure_at_scale(model, text, truth, gallery, 20, IndexConfig(ivf_from=100, nprobe=1),
                                                     exhaustive_queries=6, chunk=128)
        assert few_lists["ann_recall_at_k"] < 100.0
        assert large["top1_agreement"] == large["exact_top1_agreement"]
        framed = retrieval_speed.measure_at_scale(model, text, truth, gallery, 20, every_list, exhaustive_queries=6, chunk=128,
                                                  shortlist=40, top_frames=2)
        assert framed["shortlist"] == 40 and framed["frames_ms"] > 0 and framed["ann_recall_at_k"] == 100.0
        assert framed["two_stage_R20"] == framed["exact_two_stage_R20"]  # the same 40 found: the same frames choose
        assert framed["stage1/gt_R50"] == large["stage1/gt_R50"]  # the frames re-order the top 40 among themselves
        for row in (small, large):  # stage 1's quality: a share per k, growing with k
            for name in ("gt", "full_top1"):
                shares = [row[f"stage1/{name}_R{k}"] for k in (10, 20, 50, 100)]
                assert 0 <= shares[0] and shares == sorted(shares) and shares[-1] <= 100
        assert large["stage1/gt_R10"] == few_lists["stage1/gt_R10"]  # exact stage 1: the index does not enter
        retrieval_speed.print_in_memory([small, *few], 400)
        retrieval_speed.print_at_scale([large, few_lists, framed], 20)
        retrieval_speed.print_stage1([small, large])
        tables = capsys.readouterr().out
        assert "| 400 | 16 | mean frame |" in tables and "| 400 | 16 | frames of top 50 (best 2) |" in tables
        assert "| 400 | 6 |" in tables
        assert tables.count("| 400 | 6 | two-stage, index |") == 2 and "IVF80, nprobe 1" in tables
        assert "| 400 | 6 | two-stage, index, frames of top 40 (best 2) |" in tables
    finally:
        torch.set_grad_enabled(True)
