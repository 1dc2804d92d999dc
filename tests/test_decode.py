"""Decoding one video: the right frames, upright, at the right times, and a typed error for every broken file."""

import io
import time

import av
import decord
import numpy as np
import pytest
from conftest import marked_frames, read_frame_number, write_clip
from faulty_decoders import misbehave
from PIL import Image

from hvd.data.decode import (
    CorruptVideoError,
    EmptyVideoError,
    FrameSpec,
    MissingVideoError,
    NotAFileError,
    NoVideoStreamError,
    TruncatedVideoError,
    decode_clip,
    resize_and_crop,
)
from hvd.data.decoder_process import DecodeFailure, DecoderProcess
from hvd.data.decord_reader import DecordReader
from hvd.data.pyav_reader import PyAVReader
from hvd.data.sampling import uniform_indices


def raw_frames(clip, size: int) -> np.ndarray:
    return np.stack([np.frombuffer(f, np.uint8).reshape(size, size, 3) for f in clip.frames])


def decord_frames(path, indices) -> np.ndarray:
    return decord.VideoReader(str(path), num_threads=1).get_batch(list(indices)).asnumpy()


def test_frames_equal_decord_at_the_sampled_indices(clip_factory):
    path = clip_factory("wide.mp4", num_frames=30, height=64, width=80)
    clip = decode_clip(path, FrameSpec(num_frames=12, frame_size=64, frame_codec="raw"))
    assert clip.frame_indices == uniform_indices(30, 12).tolist()
    expected = decord_frames(path, clip.frame_indices)[:, :, 8:72]  # centre 64 of 80 columns
    np.testing.assert_array_equal(raw_frames(clip, 64), expected)
    assert [read_frame_number(f) for f in expected] == clip.frame_indices
    assert clip.timestamps_s == pytest.approx([i / 10 for i in clip.frame_indices], abs=1e-6)
    assert (clip.source_frames, clip.source_fps, clip.valid_frames) == (30, pytest.approx(10.0), 12)
    assert clip.duration_s == pytest.approx(3.0, abs=1e-6)


def test_jpeg_frames_are_the_raw_frames_after_one_jpeg_round_trip(clip_factory):
    path = clip_factory("clip.mp4", num_frames=20)
    raw = raw_frames(decode_clip(path, FrameSpec(frame_codec="raw")), 64)
    jpeg = decode_clip(path, FrameSpec(frame_codec="jpeg", jpeg_quality=90))
    for data, frame in zip(jpeg.frames, raw, strict=True):
        assert data[:2] == b"\xff\xd8"
        round_trip = io.BytesIO()
        Image.fromarray(frame).save(round_trip, format="JPEG", quality=90)
        assert data == round_trip.getvalue()


def test_resize_takes_the_short_side_then_the_centre():
    frame = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    out = resize_and_crop(frame, 30)
    scaled = np.asarray(Image.fromarray(frame).resize((50, 30), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, scaled[:, 10:40])
    np.testing.assert_array_equal(resize_and_crop(frame, 60), frame[:, 20:80])  # no resampling when sizes match


@pytest.mark.parametrize("mode", ["uniform", "fps"])
def test_short_clip_is_padded_with_blank_frames_after_its_own(clip_factory, mode):
    path = clip_factory("short.mp4", num_frames=5)  # 0.5 s at 10 fps: one second on screen for fps
    clip = decode_clip(path, FrameSpec(num_frames=12, frame_codec="raw", sample_mode=mode))
    expected = [0, 1, 2, 3, 4] if mode == "uniform" else [0]
    assert (clip.valid_frames, clip.frame_indices, len(clip.frames)) == (len(expected), expected, 12)
    frames = raw_frames(clip, 64)
    assert [read_frame_number(f) for f in frames[: clip.valid_frames]] == expected
    assert not frames[clip.valid_frames :].any()  # blank padding, masked downstream


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_rotated_phone_clip_comes_out_upright(tmp_path, rotation):
    upright = marked_frames(10, 64, 96)
    stored = np.rot90(upright, k=-rotation // 90, axes=(1, 2))  # what a phone held sideways records
    path = write_clip(tmp_path / "phone.mp4", np.ascontiguousarray(stored), rotation=rotation)
    with av.open(str(path)) as container:  # the metadata is really there: PyAV reports it
        assert next(container.decode(video=0)).rotation == (rotation if rotation != 180 else -180)
    clip = decode_clip(path, FrameSpec(num_frames=4, frame_size=64, frame_codec="raw"))
    for frame in raw_frames(clip, 64):  # 64x96 upright, centre-cropped to 64x64: the marker is top-left
        quarters = [frame[:32, :32], frame[:32, 32:], frame[32:, :32], frame[32:, 32:]]
        brightness = [q.mean() for q in quarters]
        assert np.argmax(brightness) == 0 and brightness[0] - max(brightness[1:]) > 40


def test_variable_frame_rate_with_b_frames_samples_by_presentation_time(tmp_path):
    gaps = np.random.default_rng(1).choice([20, 33, 100, 250], size=39)
    pts_ms = np.concatenate([[0], np.cumsum(gaps)]).tolist()
    path = write_clip(tmp_path / "vfr.mp4", marked_frames(40, 64, 64), pts_ms=pts_ms)
    clip = decode_clip(path, FrameSpec(num_frames=4, sample_mode="fps", frame_codec="raw"))
    seconds = np.array(pts_ms) / 1000
    wanted = np.linspace(0, np.floor(seconds[-1]), 4).astype(int)  # seconds kept after the linspace cut
    expected = [int(np.searchsorted(seconds, t, side="right") - 1) for t in wanted]
    assert clip.frame_indices == expected
    assert clip.timestamps_s == pytest.approx(seconds[expected].tolist(), abs=1e-3)
    assert [read_frame_number(f) for f in raw_frames(clip, 64)] == expected


def test_widths_decord_pads_still_give_exact_frames(clip_factory):
    path = clip_factory("w48.mp4", num_frames=12, height=48, width=48)  # dmlc/decord#336
    clip = decode_clip(path, FrameSpec(num_frames=6, frame_size=48, frame_codec="raw"))
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.testing.assert_array_equal(raw_frames(clip, 48), np.stack([every[i] for i in clip.frame_indices]))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("cut_mp4", CorruptVideoError),
        ("cut_mkv", TruncatedVideoError),
        ("random", CorruptVideoError),
        ("directory", NotAFileError),
        ("empty", EmptyVideoError),
        ("audio_only", NoVideoStreamError),
        ("missing", MissingVideoError),
    ],
)
def test_broken_file_raises_a_typed_error_naming_it(broken_videos, kind, error):
    path = broken_videos[kind]
    with pytest.raises(error) as caught:
        decode_clip(path, FrameSpec())
    assert str(path) in str(caught.value)


def test_bad_frame_spec_names_the_key():
    with pytest.raises(ValueError, match="data.frame_codec"):
        FrameSpec(frame_codec="png")


def test_cut_off_copies_are_truncated_at_every_cut_point_and_kept_only_when_asked(tmp_path):
    noisy = marked_frames(60, 64, 64) + np.random.default_rng(1).integers(0, 20, (60, 64, 64, 3), dtype=np.uint8)
    whole = write_clip(tmp_path / "whole.mkv", noisy)  # 6.0 s at 10 fps
    assert not decode_clip(whole, FrameSpec()).truncated
    data = whole.read_bytes()
    for cut in (len(data) * 3 // 4, len(data) // 2, len(data) // 5, 10_000):
        path = tmp_path / f"cut-{cut}.mkv"
        path.write_bytes(data[:cut])
        with pytest.raises(TruncatedVideoError, match=r"cover \d\.\d\d s of the 6\.00 s its container declares"):
            decode_clip(path, FrameSpec())
        kept = decode_clip(path, FrameSpec(keep_truncated=True))
        assert kept.truncated and kept.duration_s < 0.9 * 6.0
        assert not decode_clip(path, FrameSpec(min_duration_fraction=0.0)).truncated  # the check turned off


def test_decoder_process_turns_a_crash_or_hang_into_a_failure_and_carries_on():
    decoder = DecoderProcess(misbehave, timeout_s=2)
    try:
        assert decoder.decode("a.mp4", "ok") == "decoded a.mp4"
        first_child = decoder.child.pid
        assert decoder.decode("b.mp4", "raise") == DecodeFailure("missing", "b.mp4: file not found")
        assert decoder.child.pid == first_child  # an error raised in Python keeps the child
        crashed = decoder.decode("c.mp4", "crash")
        assert crashed.reason == "decoder_crash" and "c.mp4" in crashed.error and "SIGSEGV" in crashed.error
        started = time.monotonic()
        hung = decoder.decode("d.mp4", "hang")
        assert hung.reason == "timeout" and "d.mp4" in hung.error and time.monotonic() - started < 30
        assert decoder.decode("e.mp4", "ok") == "decoded e.mp4"  # a fresh child after each
        assert decoder.child.pid != first_child
    finally:
        decoder.close()


@pytest.mark.parametrize("kind", ["plain", "rotated", "variable_rate", "padded_width"])
def test_seeking_past_keyframes_gives_exactly_decords_frames(tmp_path, kind):
    """Clips with a keyframe every 7 frames take the seeking path (skipping non-reference frames)."""
    frames = marked_frames(60, 48 if kind == "padded_width" else 64, 48 if kind == "padded_width" else 80)
    options = {"rotated": {"rotation": 90}, "variable_rate": {"pts_ms": np.cumsum([0, *[33, 100, 20] * 19, 40, 50]).tolist()}}
    path = write_clip(tmp_path / f"{kind}.mp4", frames, keyframe_every=7, **options.get(kind, {}))
    with DecordReader(path) as decord_reader, PyAVReader(path) as seeker:
        assert len(decord_reader.reader.get_key_indices()) > 1 and len(seeker) == len(decord_reader)
        for indices in (np.array([3, 10, 11, 30, 58]), uniform_indices(len(decord_reader), 12), np.arange(60)):
            seeking = seeker.seek(indices)
            assert seeking is not None
            np.testing.assert_array_equal(seeking, decord_reader._get_batch(indices))  # decord's, unpadded
    clip = decode_clip(path, FrameSpec(num_frames=12, frame_size=48, frame_codec="raw"))
    if kind != "rotated":
        assert [read_frame_number(f) for f in raw_frames(clip, 48)] == clip.frame_indices


def test_decoder_process_map_keeps_order_and_blames_only_the_video_that_failed():
    decoder = DecoderProcess(misbehave, timeout_s=2)
    try:
        actions = ["ok", "crash", "ok", "raise", "hang", "ok", "ok"]
        results = list(decoder.map((f"{i}.mp4", (action,)) for i, action in enumerate(actions)))
        kinds = [r.reason if isinstance(r, DecodeFailure) else r for r in results]
        assert kinds == ["decoded 0.mp4", "decoder_crash", "decoded 2.mp4", "missing", "timeout", "decoded 5.mp4",
                         "decoded 6.mp4"]  # the call queued behind a crash or a hang is decoded by the next child
        stopped_early = decoder.map((f"{i}.mp4", ("ok",)) for i in range(5))
        assert next(stopped_early) == "decoded 0.mp4"
        stopped_early.close()  # its queued call's reply must not leak into the next map
        assert decoder.decode("x.mp4", "ok") == "decoded x.mp4"
    finally:
        decoder.close()
