"""Prepare after faults: a staging part damaged behind its done marker is decoded again, and --overwrite never
resumes an interrupted run."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

import hvd.data.prepare as prepare_module
from hvd.config import SyntheticConfig, load_config
from hvd.data.decode import FrameSpec
from hvd.data.folders import resumable_staging
from hvd.data.manifest import index_manifest
from hvd.data.prepare import prepare
from hvd.data.synthetic import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(SyntheticConfig(preset="tiny", out=str(tmp_path_factory.mktemp("synth")), workers=1), progress=False)


class Interrupted(RuntimeError):
    """Stands for a kill at the point it is raised."""


def _interrupt(*args, **kwargs):
    raise Interrupted


def test_a_part_damaged_behind_its_marker_is_decoded_again(tiny, tmp_path, monkeypatch, capsys):
    cfg = load_config(None, ["data.shard_videos=2"])  # 20 parts of 2 videos
    out, staging = tmp_path / "shards", tmp_path / ".shards.partial"
    with monkeypatch.context() as patch:  # every part written and marked done, then a kill before the summary
        patch.setattr(prepare_module, "_finish", _interrupt)
        with pytest.raises(Interrupted):
            prepare(cfg, tiny, out)
    damaged = sorted((staging / "train").glob("part-*.parquet"))[1]
    rows = pq.read_table(damaged)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # its marker reached the disk, half of it did not
    part = int(damaged.stem.split("-")[1])

    summary = prepare(cfg, tiny, out)
    printed = capsys.readouterr().out
    assert f"part {part} failed verification (train/{damaged.name} is unreadable" in printed
    assert "resuming an interrupted run, 19 of 20 parts already written" in printed
    assert (summary.input, summary.written) == (40, 40)
    assert pq.read_table(out / "train" / damaged.name).equals(rows)


def test_overwrite_starts_an_interrupted_run_from_the_beginning(tiny, tmp_path, monkeypatch, capsys):
    cfg = load_config(None, [])
    out = tmp_path / "shards"
    identity = prepare_module._identity(FrameSpec.from_config(cfg.data), index_manifest(tiny).fingerprint, None)
    staging, _ = resumable_staging(out, identity)  # what an interrupted run of these settings left
    (staging / "_parts").mkdir()
    (staging / "_parts" / "part-000000.done").write_text("2\n")
    seen = []

    def record(index, job, data, resumed):
        seen.append((resumed, sorted(path.name for path in job.out.rglob("*.done"))))
        raise Interrupted

    monkeypatch.setattr(prepare_module, "_decode_missing_parts", record)
    with pytest.raises(Interrupted):
        prepare(cfg, tiny, out)
    with pytest.raises(Interrupted):
        prepare(cfg, tiny, out, overwrite=True)
    assert seen == [(True, ["part-000000.done"]), (False, [])]
    assert "removing what an interrupted run left in .shards.partial (overwrite" in capsys.readouterr().out
