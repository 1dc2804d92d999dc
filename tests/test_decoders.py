"""The two decoders behind `data.decoder`: the same frames from decord and PyAV, the same quarantine reasons, the
key's validation, and PyAV taken when decord does not import."""

import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import marked_frames, read_frame_number, write_broken_videos, write_clip

from hvd.config import ConfigError, load_config
from hvd.data.decode import (
    ClipDecoder,
    CorruptVideoError,
    DecodedClip,
    FrameSpec,
    TruncatedVideoError,
    VideoDecodeError,
    choose_decoder,
    decode_clip,
)
from hvd.data.manifest import ManifestEntry, write_manifest
from hvd.data.prepare import prepare

# Largest difference of one pixel channel allowed between the decoders' frames. Measured on every clip below
# (PyAV 18.1 with FFmpeg 8.0 against decord 0.6 with FFmpeg 4.1): max 0 and mean 0, the same bytes. A PyAV
# upgrade that changes its colour conversion fails here, and docs/data.md's claim must be measured again.
PIXEL_TOLERANCE = 0
VFR_MS = np.cumsum([0, *[33, 100, 20, 250] * 9, 40, 50, 33]).tolist()  # 40 frames, B-frames reordered


def _phone_clip(path: Path, rotation: int) -> Path:
    """Marked frames as a phone held at `rotation` records them: stored turned, upright once the display
    matrix is applied."""
    stored = np.rot90(marked_frames(10, 64, 96), k=-rotation // 90, axes=(1, 2))
    return write_clip(path, np.ascontiguousarray(stored), rotation=rotation)


def _clip(folder: Path, kind: str) -> Path:
    """One of the test clips the decoders are compared on, written as `conftest.write_clip` writes them."""
    builders = {
        "one_gop": lambda path: write_clip(path, marked_frames(30, 64, 80)),
        "keyframe_every_7": lambda path: write_clip(path, marked_frames(60, 64, 80), keyframe_every=7),
        "odd_size": lambda path: write_clip(path, marked_frames(25, 50, 90)),
        "padded_width": lambda path: write_clip(path, marked_frames(12, 48, 48)),  # dmlc/decord#336
        "rotated_90": lambda path: _phone_clip(path, 90),
        "rotated_180": lambda path: _phone_clip(path, 180),
        "variable_rate": lambda path: write_clip(path, marked_frames(40, 64, 64), pts_ms=VFR_MS),
        "matroska": lambda path: write_clip(path.with_suffix(".mkv"), marked_frames(60, 64, 64), keyframe_every=10),
    }
    return builders[kind](folder / f"{kind}.mp4")


def _raw(clip: DecodedClip) -> np.ndarray:
    return np.stack([np.frombuffer(frame, np.uint8) for frame in clip.frames]).astype(np.int16)


@pytest.mark.parametrize("mode", ["uniform", "fps"])
@pytest.mark.parametrize(
    "kind",
    ["one_gop", "keyframe_every_7", "odd_size", "padded_width", "rotated_90", "rotated_180", "variable_rate",
     "matroska"],
)
def test_decord_and_pyav_sample_the_same_frames(tmp_path, kind, mode):
    path = _clip(tmp_path, kind)
    spec = FrameSpec(num_frames=12, sample_mode=mode, frame_size=48, frame_codec="raw")
    decord_clip, pyav_clip = (decode_clip(path, spec, decoder=decoder) for decoder in ("decord", "pyav"))
    assert pyav_clip.frame_indices == decord_clip.frame_indices
    assert pyav_clip.timestamps_s == decord_clip.timestamps_s  # float32 as decord keeps them, so fps picks alike
    assert (pyav_clip.source_frames, pyav_clip.source_fps) == (decord_clip.source_frames, decord_clip.source_fps)
    assert (pyav_clip.valid_frames, pyav_clip.truncated) == (decord_clip.valid_frames, decord_clip.truncated)
    assert np.abs(_raw(pyav_clip) - _raw(decord_clip)).max() <= PIXEL_TOLERANCE
    if kind == "variable_rate":  # FFmpeg 4.1 reads each MP4 packet's duration as 1 ms here, 8.0 as its gap
        assert abs(pyav_clip.duration_s - decord_clip.duration_s) <= 0.25  # at most the last frame's length
    else:
        assert pyav_clip.duration_s == decord_clip.duration_s
    frames = _raw(pyav_clip)[: pyav_clip.valid_frames].reshape(-1, 48, 48, 3).astype(np.uint8)
    assert [read_frame_number(frame) for frame in frames] == pyav_clip.frame_indices


def test_pyav_reads_an_mpeg_ts_clip_decord_cannot_decode(tmp_path):
    """MPEG-TS with B-frames and a 1.4 s start time: PyAV's index starts at 0 s, as decord's does, and its frames
    are the right ones; decord fails on the first frame it decodes."""
    path = write_clip(tmp_path / "clip.ts", marked_frames(30, 64, 64))
    with pytest.raises(CorruptVideoError, match="frame 0 does not decode"):
        decode_clip(path, FrameSpec(num_frames=12, frame_codec="raw"), decoder="decord")
    clip = decode_clip(path, FrameSpec(num_frames=12, frame_codec="raw"), decoder="pyav")
    frames = _raw(clip).reshape(-1, 64, 64, 3).astype(np.uint8)
    assert [read_frame_number(frame) for frame in frames] == clip.frame_indices
    assert clip.timestamps_s[0] == 0.0 and clip.duration_s == pytest.approx(3.0)


def _faststart_mp4(folder: Path) -> bytes:
    """An MP4 with its index first (`movflags=faststart`), noisy so its packets are large."""
    frames = marked_frames(60, 64, 64) + np.random.default_rng(0).integers(0, 20, (60, 64, 64, 3), dtype=np.uint8)
    path = folder / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"crf": "10", "threads": "1"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["cut_mp4", "cut_mkv", "random", "directory", "empty", "audio_only", "missing",
                                  "garbled_mp4"])
def test_both_decoders_quarantine_a_broken_file_for_the_same_reason(tmp_path, kind):
    videos = write_broken_videos(tmp_path / "broken")
    if kind == "garbled_mp4":  # an index that reads, 3 KB of noise in the middle of the frames
        data = bytearray(_faststart_mp4(tmp_path))
        data[len(data) // 2 : len(data) // 2 + 3000] = np.random.default_rng(1).bytes(3000)
        videos[kind] = tmp_path / "garbled.mp4"
        videos[kind].write_bytes(bytes(data))
    errors = {}
    for decoder in ("decord", "pyav"):
        with pytest.raises(VideoDecodeError) as caught:
            decode_clip(videos[kind], FrameSpec(), decoder=decoder)
        errors[decoder] = caught.value
    assert type(errors["pyav"]) is type(errors["decord"])
    assert errors["pyav"].reason == errors["decord"].reason
    if kind == "garbled_mp4":
        assert all("does not decode" in str(error) for error in errors.values())
    else:  # found before either decoder opens the file, or by the shared truncation check
        assert str(errors["pyav"]) == str(errors["decord"])


def test_a_faststart_mp4_cut_short_is_corrupt_for_decord_and_truncated_for_pyav(tmp_path):
    """The one difference found: FFmpeg 4.1 (decord's) fails reading the packets at the cut, 8.0 (PyAV's) stops
    there, so PyAV sees the frames before the cut and the shared check calls the clip truncated."""
    data = _faststart_mp4(tmp_path)
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptVideoError, match="decord cannot open it"):
        decode_clip(path, FrameSpec(), decoder="decord")
    with pytest.raises(TruncatedVideoError, match=r"cover 3\.00 s of the 6\.00 s"):
        decode_clip(path, FrameSpec(), decoder="pyav")


def test_data_decoder_takes_auto_decord_or_pyav_and_names_the_key_otherwise():
    assert load_config().data.decoder == "auto"
    assert load_config(None, ["data.decoder=pyav"]).data.decoder == "pyav"
    with pytest.raises(ConfigError, match=r"'data\.decoder': 'ffmpeg' \(choose one of auto, decord, pyav\)"):
        load_config(None, ["data.decoder=ffmpeg"])
    with pytest.raises(ConfigError, match=r"'data\.decoder'"):
        choose_decoder("opencv")
    assert choose_decoder("auto") == "decord"  # decord imports here: the default stays decord
    assert choose_decoder("pyav") == "pyav"


BLOCKED = """
import pickle
import sys
sys.modules["decord"] = None  # `import decord` now raises ImportError, as where no decord wheel installs
from hvd.config import ConfigError
from hvd.data.decode import FrameSpec, choose_decoder, decode_clip
try:
    choose_decoder("decord")
except ConfigError as err:
    print("refused:", err)
clip = decode_clip(sys.argv[1], FrameSpec(num_frames=4, frame_codec="raw"))
print("auto:", choose_decoder("auto"), clip.frame_indices, clip.valid_frames)
print("prepare's children:", pickle.loads(bytes.fromhex(sys.argv[2])).decoder)
"""


def test_without_decord_auto_decodes_with_pyav_and_an_explicit_decord_is_refused(tmp_path):
    """In a process where `import decord` fails: `auto` means PyAV, nothing imports decord on the way, and
    `data.decoder=decord` is refused naming the way out."""
    path = write_clip(tmp_path / "clip.mp4", marked_frames(20, 64, 64))
    auto = pickle.dumps(ClipDecoder("auto")).hex()  # decord here: it travels as `auto` and chooses again there
    command = [sys.executable, "-c", BLOCKED, str(path), auto]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    refused, decoded, child = run.stdout.strip().splitlines()
    assert "data.decoder=decord, but decord does not import here" in refused and "data.decoder=pyav" in refused
    assert decoded == f"auto: pyav {decode_clip(path, FrameSpec(num_frames=4)).frame_indices} 4"
    assert child == "prepare's children: pyav"


UNPICKLE = """
import pickle, sys
decoder = pickle.loads(sys.stdin.buffer.read())
print(decoder.decoder, "decord" in sys.modules)
"""


@pytest.mark.parametrize(("choice", "seen"), [("auto", "decord True"), ("pyav", "pyav False")])
def test_prepares_decode_function_imports_its_reader_when_a_child_unpickles_it(choice, seen):
    """Before the child's memory limit (hvd.data.decoder_process); and PyAV's never loads decord."""
    run = subprocess.run([sys.executable, "-c", UNPICKLE], input=pickle.dumps(ClipDecoder(choice)),
                         capture_output=True, timeout=300)
    assert run.stdout.decode().strip() == seen, run.stderr.decode()


def test_prepare_refuses_an_explicit_decord_that_does_not_import_before_any_work(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "clip.mp4", marked_frames(10, 64, 64))
    manifest = write_manifest([ManifestEntry("clip", str(path), ["a caption"], "train")], tmp_path / "m.jsonl")
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(ConfigError, match=r"data\.decoder=pyav"):
        prepare(load_config(None, ["data.decoder=decord"]), manifest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
