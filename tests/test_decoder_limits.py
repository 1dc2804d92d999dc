"""Untrusted videos: one past a size limit is refused before decoding, one that allocates without bound fails
inside its decoder's memory limit; both are quarantined and the videos after them still decode."""

import cloudpickle
import faulty_decoders
import pyarrow.parquet as pq
import pytest
import ray
from conftest import marked_frames, write_clip
from faulty_decoders import misbehave

import hvd.data.decode as decode
from hvd.config import load_config
from hvd.data.decode import FrameSpec, TooLargeVideoError, VideoLimits, decode_clip
from hvd.data.decoder_process import DecoderProcess, DecoderStartError
from hvd.data.manifest import ManifestEntry, write_manifest
from hvd.data.prepare import QUARANTINE_FILE, prepare

# 80x64 pixels, 20 frames at 10 fps: 2 s.
CLIP = {"num_frames": 20, "height": 64, "width": 80}
OVER = {  # each limit just below the clip's, and what the message then names
    "max_video_pixels": (80 * 64 - 1, r"frame size \(80x64\) is 5120, above data\.max_video_pixels=5119"),
    "max_video_frames": (19, r"frame count is 20, above data\.max_video_frames=19"),
    "max_video_duration_s": (1.5, r"duration in seconds is 2, above data\.max_video_duration_s=1\.5"),
}


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("key", list(OVER))
def test_a_video_past_a_limit_is_refused_naming_the_key(clip_factory, key, decoder):
    path = clip_factory("clip.mp4", **CLIP)
    limit, message = OVER[key]
    with pytest.raises(TooLargeVideoError, match=message) as caught:
        decode_clip(path, FrameSpec(), VideoLimits(**{key: limit}), decoder=decoder)
    assert caught.value.reason == "too_large" and str(path) in str(caught.value)
    assert decode_clip(path, FrameSpec(), VideoLimits(), decoder=decoder).valid_frames == 12  # within the defaults


@pytest.mark.parametrize(("decoder", "name"), [("decord", "decord"), ("pyav", "PyAV")])
@pytest.mark.parametrize(
    ("key", "limit", "message"),
    [
        ("max_video_frames", 19, "frame count in {name}'s index is 20"),
        ("max_video_duration_s", 1.5, "timestamps' span"),
    ],
)
def test_an_undeclared_size_is_bounded_by_the_decoders_index(clip_factory, monkeypatch, key, limit, message, decoder,
                                                              name):
    """Frame count and timestamps size the decoder's index and `fps` sampling's arrays: checked before either."""
    path = clip_factory("clip.mp4", **CLIP)
    monkeypatch.setattr(decode, "_probe", lambda p: decode._Probe(80, 64, 0, None))
    with pytest.raises(TooLargeVideoError, match=message.format(name=name)):
        decode_clip(path, FrameSpec(sample_mode="fps"), VideoLimits(**{key: limit}), decoder=decoder)


def test_a_decoder_that_outgrows_its_memory_limit_fails_that_video_only():
    decoder = DecoderProcess(misbehave, timeout_s=30, memory_mb=1024)
    try:
        assert decoder.decode("a.mp4", "ok") == "decoded a.mp4"
        child = decoder.child.pid
        hog = decoder.decode("b.mp4", "hog")
        assert hog.reason == "out_of_memory" and "b.mp4" in hog.error
        assert "data.decode_memory_mb=1024" in hog.error
        assert decoder.decode("c.mp4", "ok") == "decoded c.mp4"
        assert decoder.child.pid == child  # the child goes on
    finally:
        decoder.close()
    unlimited = DecoderProcess(misbehave, timeout_s=30)  # unlimited, the same call fits: it only reserves
    try:
        assert unlimited.decode("b.mp4", "hog").startswith("reserved")
    finally:
        unlimited.close()


def test_a_memory_limit_below_the_decoders_own_imports_stops_the_job():
    # Python, NumPy and PyAV alone take about 250 MB of address space (decord, when its reader is chosen, 76 more).
    with pytest.raises(DecoderStartError, match=r"data\.decode_memory_mb=128 is below the \d+ MB"):
        DecoderProcess(misbehave, timeout_s=30, memory_mb=128).decode("a.mp4", "ok")


@pytest.mark.slow
def test_prepare_quarantines_videos_too_large_or_out_of_memory_and_writes_the_rest(tmp_path):
    videos = {  # frames, width, fps
        "wide": (10, 80, 10),
        "long": (30, 64, 10),
        "slow": (20, 64, 5),
        "hog": (10, 64, 10),
        "fine": (10, 64, 10),
    }
    entries = []
    for name, (frames, width, fps) in videos.items():
        path = write_clip(tmp_path / f"{name}.mp4", marked_frames(frames, 64, width), fps=fps)
        entries.append(ManifestEntry(name, str(path), ["a caption"], "train"))
    manifest = write_manifest(entries, tmp_path / "manifest.jsonl")
    for pickler in (cloudpickle, ray.cloudpickle):  # the function travels by value to Ray and on to the child
        pickler.register_pickle_by_value(faulty_decoders)
    limits = ["data.max_video_pixels=4096", "data.max_video_frames=25", "data.max_video_duration_s=3"]
    cfg = load_config(None, [*limits, "data.decode_memory_mb=1024", "data.decode_concurrency=1"])
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        summary = prepare(cfg, manifest, tmp_path / "out", decode=faulty_decoders.by_file_name)
    finally:
        ray.shutdown()
    rows = pq.read_table(tmp_path / "out" / QUARANTINE_FILE).to_pylist()
    quarantine = {row["video_id"]: row for row in rows}
    reasons = {video: row["reason"] for video, row in quarantine.items()}
    assert reasons == {"wide": "too_large", "long": "too_large", "slow": "too_large", "hog": "out_of_memory"}
    keys = {"wide": "max_video_pixels", "long": "max_video_frames", "slow": "max_video_duration_s"}
    for video, key in keys.items():
        assert f"data.{key}=" in quarantine[video]["error"]
    assert (summary.written, summary.quarantined) == (1, 4)  # "fine", decoded after the hog in the same part
