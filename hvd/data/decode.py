"""Decode one video with decord into the sampled, resized, encoded frames of one shard row.

Rotation: decord 0.6 reads the container's display matrix and returns 90/180/270 degree clips upright
(checked in tests/test_decode.py against PyAV's `VideoFrame.rotation`), so frames are not turned again
here; it ignores the mirroring part of a display matrix, which phones do not write. Variable frame rate and B-frame reordering: frames are indexed in presentation order and sampled
by decord's per-frame timestamps.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import av
import decord
import numpy as np
from PIL import Image

from hvd.config import DataConfig, check_values
from hvd.data.sampling import sample_indices


class VideoDecodeError(ValueError):
    """A video that cannot give frames; `reason` is a short machine-readable kind for the quarantine."""

    reason = "corrupt"

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = str(path)


class MissingVideoError(VideoDecodeError):
    reason = "missing"


class EmptyVideoError(VideoDecodeError):
    reason = "empty"


class NoVideoStreamError(VideoDecodeError):
    reason = "no_video_stream"


class CorruptVideoError(VideoDecodeError):
    reason = "corrupt"


class NotAFileError(VideoDecodeError):
    reason = "not_a_file"


class TooLargeVideoError(VideoDecodeError):
    """More frames, pixels or seconds than `VideoLimits` allow: refused before any frame is decoded."""

    reason = "too_large"


class TruncatedVideoError(VideoDecodeError):
    """Decodable frames that cover much less than the container says the video lasts: a cut-off copy."""

    reason = "truncated"


_DATA = DataConfig()  # the defaults below are the data keys' own


@dataclass(frozen=True)
class FrameSpec:
    """Everything that decides a shard's frames (the `data.*` keys of the same names): stored with the shards
    and compared on a re-run."""

    num_frames: int = _DATA.num_frames
    sample_mode: str = _DATA.sample_mode
    frame_size: int = _DATA.frame_size
    frame_codec: str = _DATA.frame_codec
    jpeg_quality: int = _DATA.jpeg_quality
    min_duration_fraction: float = _DATA.min_duration_fraction
    keep_truncated: bool = _DATA.keep_truncated

    def __post_init__(self) -> None:
        check_values({f"data.{key}": value for key, value in self.to_dict().items()})

    @classmethod
    def from_config(cls, data: DataConfig) -> FrameSpec:
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VideoLimits:
    """How large a video may be before it is decoded at all: a file's header or timestamps can claim sizes
    that would make the decoder allocate gigabytes. Not part of the shard identity: changing a limit changes
    which videos are refused, not the frames of those kept."""

    max_video_frames: int = _DATA.max_video_frames
    max_video_pixels: int = _DATA.max_video_pixels  # width x height of one frame
    max_video_duration_s: float = _DATA.max_video_duration_s

    @classmethod
    def from_config(cls, data: DataConfig) -> VideoLimits:
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})

    def check(self, path: Path, key: str, value: float, what: str) -> None:
        """Refuse the video when `value`, its `what`, exceeds the limit `key` names."""
        limit = getattr(self, key)
        if not value <= limit:  # NaN too
            over = f"its {what} is {_number(value)}, above data.{key}={_number(limit)}"
            raise TooLargeVideoError(path, f"{over}; refused before decoding")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@dataclass
class DecodedClip:
    frames: list[bytes]  # `num_frames` JPEG files, or H*W*3 raw RGB bytes; blank after `valid_frames`
    valid_frames: int  # the clip's own frames, first; fewer than `num_frames` on a short clip
    frame_indices: list[int]  # of the valid frames, into the source's frames in presentation order
    timestamps_s: list[float]  # of the valid frames
    source_frames: int
    source_fps: float
    duration_s: float
    truncated: bool  # kept although truncated (`FrameSpec.keep_truncated`)


def resize_and_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Short side to `size` (bicubic, as CLIP's preprocessing), then the centre `size` x `size` square."""
    height, width = frame.shape[:2]
    scale = size / min(height, width)
    new_height, new_width = max(size, int(height * scale)), max(size, int(width * scale))
    if (new_height, new_width) != (height, width):
        image = Image.fromarray(frame).resize((new_width, new_height), Image.Resampling.BICUBIC)
        frame = np.asarray(image)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.ascontiguousarray(frame[top : top + size, left : left + size])


def encode_frame(frame: np.ndarray, codec: str, jpeg_quality: int) -> bytes:
    if codec == "raw":
        return frame.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


@dataclass
class _Probe:
    """What the container says about its first video stream, read without decoding it."""

    width: int
    height: int
    frames: int  # 0 where the container does not say
    duration_s: float | None  # see `_declared_duration_s`


def _declared_duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """How long the container says the video stream lasts, None where it says nothing.

    The stream's own duration (MP4, MPEG-TS), else Matroska's per-stream DURATION tag, else the container's
    duration. A cut-off Matroska file still declares the whole length while decord decodes what is left
    of it; an MPEG-TS file declares nothing but what is there, so a cut there cannot be told.
    """
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if tag := stream.metadata.get("DURATION"):
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return container.duration / av.time_base if container.duration else None


def _probe(path: Path) -> _Probe:
    """The video stream's declared size; PyAV also names what is wrong with a file no decoder can open."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = ", ".join(stream.type for stream in container.streams) or "none"
                raise NoVideoStreamError(path, f"no video stream (streams: {kinds})")
            stream = container.streams.video[0]
            codec = stream.codec_context
            return _Probe(codec.width, codec.height, stream.frames, _declared_duration_s(container, stream))
    except av.FFmpegError as err:
        if isinstance(err, MemoryError):  # av.error.MemoryError is both: the memory limit, not the file
            raise
        raise CorruptVideoError(path, f"not a readable media file ({err})") from None


def _last_line(err: Exception) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _display_width(path: Path, display_height: int) -> int:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context
        return codec.width if codec.height == display_height else codec.height


def _seek_frames(path: Path, indices: np.ndarray, num_source: int) -> np.ndarray | None:
    """`[K, H, W, 3]` RGB frames at sorted unique presentation `indices`, decoding as little as exactness allows.

    For each sample the decoder jumps to the keyframe before it, unless it is already inside that keyframe's
    group (one-GOP clips decode straight through once); frames before the sample that no other frame
    references (`skip_frame=NONREF`) are not decoded at all. decord's random access decodes and converts
    every frame from the keyframe on, about twice the work on clips with a keyframe every few seconds.
    None when the stream's packets do not match decord's frame index (then decord reads the frames).
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        context.thread_count = 1
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size]
        if len(packets) != num_source:
            return None
        order = sorted(pts for pts, _ in packets)
        keyframes = sorted(pts for pts, keyframe in packets if keyframe)
        target, frames, position, decoded = 0, [], None, iter(())

        def decode_from_here():  # frames in presentation order; skips what precedes the current target unreferenced
            for packet in container.demux(stream):
                context.skip_frame = "NONREF" if packet.pts is not None and packet.pts < target else "DEFAULT"
                yield from context.decode(packet)

        for index in indices.tolist():
            target = order[index]
            key = keyframes[max(0, bisect.bisect_right(keyframes, target) - 1)]
            if position is None or position < key:  # the sample's keyframe lies ahead: jump there
                container.seek(key, stream=stream, backward=True)
                decoded = decode_from_here()
            found = None
            for frame in decoded:
                position = frame.pts
                if frame.pts >= target:
                    found = frame if frame.pts == target else None
                    break
            if found is None:
                return None
            image = found.to_ndarray(format="rgb24")
            frames.append(np.rot90(image, k=found.rotation // 90) if found.rotation else image)
        return np.stack(frames)


def _read_frames(reader: decord.VideoReader, indices: np.ndarray, path: Path) -> np.ndarray:
    """`[K, H, W, 3]` RGB frames at sorted unique `indices`.

    decord 0.6 pads the rows of some frame widths (16, 24, 48, 72 px among others) and then fails to
    batch them (dmlc/decord#336); single frames still arrive, padded, and are trimmed to the real width.
    """
    try:
        return reader.get_batch(indices.tolist()).asnumpy()
    except decord.DECORDError as batch_error:
        frames = []
        for index in indices.tolist():
            try:
                frame = reader[index].asnumpy()
            except decord.DECORDError as err:
                raise CorruptVideoError(path, f"frame {index} does not decode ({_last_line(err)})") from None
            if frame.shape[2] != 3:
                width = _display_width(path, frame.shape[0])
                if frame.shape[1] * frame.shape[2] < width * 3:
                    raise CorruptVideoError(path, f"frame {index}: {_last_line(batch_error)}") from None
                frame = frame.reshape(frame.shape[0], -1)[:, : width * 3].reshape(frame.shape[0], width, 3)
            frames.append(frame)
        return np.stack(frames)


def decode_clip(path: str | Path, spec: FrameSpec, limits: VideoLimits = VideoLimits()) -> DecodedClip:
    """Sample, resize and encode `spec.num_frames` frames of one video; every failure is a `VideoDecodeError`.

    A video past `limits` is refused from its header, then from decord's frame index and timestamps,
    before any frame is decoded.
    """
    path = Path(path)
    if not path.exists():
        raise MissingVideoError(path, "file not found")
    if not path.is_file():
        raise NotAFileError(path, "not a file (a directory or a device)")
    if path.stat().st_size == 0:
        raise EmptyVideoError(path, "file is empty (0 bytes)")
    probe = _probe(path)
    size = f"frame size ({probe.width}x{probe.height})"
    limits.check(path, "max_video_pixels", probe.width * probe.height, size)
    limits.check(path, "max_video_frames", probe.frames, "declared frame count")
    if probe.duration_s is not None:
        limits.check(path, "max_video_duration_s", probe.duration_s, "declared duration in seconds")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        raise CorruptVideoError(path, f"decord cannot open it ({_last_line(err)})") from None
    num_source = len(reader)
    if num_source == 0:
        raise CorruptVideoError(path, "video stream holds no frames")
    limits.check(path, "max_video_frames", num_source, "frame count in decord's index")
    timestamps = reader.get_frame_timestamp(np.arange(num_source))
    # What the timestamps span bounds the arrays `fps` sampling sizes from them (one entry per second).
    span = float(timestamps.max() - timestamps.min())
    limits.check(path, "max_video_duration_s", span, "timestamps' span in seconds")
    covered = float(timestamps[-1, 1] - timestamps[0, 0])
    declared = probe.duration_s if spec.min_duration_fraction > 0 else None  # 0: the check is off
    truncated = declared is not None and covered < spec.min_duration_fraction * declared
    if truncated and not spec.keep_truncated:
        raise TruncatedVideoError(
            path, f"its frames cover {covered:.2f} s of the {declared:.2f} s its container declares (below "
            f"data.min_duration_fraction={spec.min_duration_fraction}); data.keep_truncated=true keeps such clips"
        )
    indices = sample_indices(spec.sample_mode, timestamps[:, 0], spec.num_frames)
    # Several keyframes: seeking can skip work. One (short clips): decord decodes straight through, cheaper.
    sampled = _seek_frames(path, indices, num_source) if len(reader.get_key_indices()) > 1 else None
    if sampled is None:
        sampled = _read_frames(reader, indices, path)
    frames = [resize_and_crop(frame, spec.frame_size) for frame in sampled]
    blank = np.zeros((spec.frame_size, spec.frame_size, 3), np.uint8)
    frames += [blank] * (spec.num_frames - len(frames))
    return DecodedClip(
        frames=[encode_frame(frame, spec.frame_codec, spec.jpeg_quality) for frame in frames],
        valid_frames=len(indices),
        frame_indices=indices.tolist(),
        timestamps_s=timestamps[indices, 0].tolist(),
        source_frames=num_source,
        source_fps=float(reader.get_avg_fps()),
        duration_s=covered,
        truncated=truncated,
    )
