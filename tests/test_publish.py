"""Every publishing rename is durable: what it publishes is fsynced before the rename, its folder after."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from hvd.checkpoint import STATE_FILE, save_state
from hvd.config import IndexConfig, ModelConfig
from hvd.data.folders import STAGING_IDENTITY, publish, resumable_staging
from hvd.data.prepare import _write_atomic
from hvd.gallery import ANN_FILE, FEATURES_FILE, IDS_FILE, META_FILE, write_index
from hvd.model import VideoFeatures, build_model, save_weights
from hvd.runtime.durable import write_text

Events = list[tuple[str, ...]]


@pytest.fixture
def disk(monkeypatch) -> Events:
    """Every fsync (with the path it flushed) and rename (source, target), in order."""
    events: Events = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy(real):
        def move(source, target, **kwargs):
            events.append(("rename", str(Path(source).resolve()), str(Path(target).resolve())))
            real(source, target, **kwargs)
        return move

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy(replace))
    monkeypatch.setattr(os, "rename", spy(rename))
    return events


def assert_durable(events: Events, target: Path, files: tuple[str, ...] = ()) -> None:
    """`target` was renamed into place after its data (each of `files`, for a folder) was fsynced, and its
    parent folder fsynced after the rename."""
    target = target.resolve()
    (at,) = [i for i, event in enumerate(events) if event[0] == "rename" and event[2] == str(target)]
    source = Path(events[at][1])
    synced_before = {event[1] for event in events[:at] if event[0] == "fsync"}
    for path in [source / name for name in files] or [source]:
        assert str(path) in synced_before, f"{path} was renamed to {target} before it reached the disk"
    assert str(target.parent) in {event[1] for event in events[at + 1 :] if event[0] == "fsync"}, (
        f"the rename to {target} was never flushed: {target.parent} not fsynced after it")


def test_shard_files_markers_and_staging_stamps_are_durable(disk, tmp_path):
    shard = tmp_path / "staging" / "train" / "part-000000.parquet"
    _write_atomic(pa.table({"video_id": ["a", "b"]}), shard)
    assert_durable(disk, shard)
    marker = write_text(tmp_path / "staging" / "_parts" / "part-000000.done", "2\n")
    assert_durable(disk, marker)
    staging, resumed = resumable_staging(tmp_path / "shards", {"shard_format": 3})
    assert not resumed
    assert_durable(disk, staging / STAGING_IDENTITY)


def test_a_published_folder_reaches_the_disk_before_its_name(disk, tmp_path):
    staging, folder = tmp_path / ".out.partial", tmp_path / "out"
    (staging / "train").mkdir(parents=True)
    (staging / "train" / "part-0.parquet").write_bytes(b"rows")
    (staging / "_summary.json").write_text("{}")
    folder.mkdir()  # replaced whole
    publish(staging, folder)
    assert_durable(disk, folder, ("train/part-0.parquet", "_summary.json", "train", "."))


def test_checkpoints_and_weights_are_durable(disk, tmp_path):
    model = build_model(ModelConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(tmp_path, model, optimizer, scheduler, step=1, epoch=0, best_score=0.0, config_yaml="")
    assert_durable(disk, tmp_path / STATE_FILE)
    weights = save_weights(model, tmp_path / "warm" / "clip.safetensors")
    assert_durable(disk, weights)


def test_a_gallery_index_folder_is_durable(disk, tmp_path):
    video = VideoFeatures(
        frames=torch.randn(4, 3, 8), frame_mask=torch.ones(4, 3, dtype=torch.bool), patches=torch.zeros(4, 0, 8),
        patch_frames=torch.zeros(4, 0, 3, dtype=torch.bool), frame_views=torch.zeros(4, 0, 3, 8),
    )
    embeddings = F.normalize(torch.randn(4, 8), dim=-1)
    write_index(tmp_path / "idx", list("abcd"), video, embeddings, IndexConfig(), {})
    assert_durable(disk, tmp_path / "idx", (META_FILE, IDS_FILE, FEATURES_FILE, ANN_FILE))
