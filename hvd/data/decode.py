"""Decode one video into the sampled, resized, encoded frames of one shard row, whichever decoder reads it.

What a decoder does is a `FrameReader` (`hvd.data.decord_reader`, `hvd.data.pyav_reader`): a video's frame
index, then the frames at sampled indices. Everything else is here, once: the checks and limits before
decoding, sampling, the truncation check, resizing and encoding. `data.decoder` picks the reader (`auto`:
decord where it imports, else PyAV); both give the same frame indices and, on the test clips, the same pixels
(`tests/test_decoders.py`), so the decoder is not part of a shard's identity. Variable frame rate and B-frame
reordering: frames are indexed in presentation order and sampled by their presentation timestamps.
"""

from __future__ import annotations

import importlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from hvd.config import CHOICES, ConfigError, DataConfig, check_values
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


def last_line(err: Exception) -> str:
    """The line of a native decoder's error that says what went wrong."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@contextmanager
def ffmpeg_errors_as_corrupt(path: Path, what: str) -> Iterator[None]:
    """An FFmpeg error inside becomes a `CorruptVideoError` saying `what`; a failed allocation stays a
    `MemoryError` (av.error.MemoryError is both): the memory limit's doing, not the file's."""
    try:
        yield
    except av.FFmpegError as err:
        if isinstance(err, MemoryError):
            raise
        raise CorruptVideoError(path, f"{what} ({last_line(err)})") from None


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
    duration. A cut-off Matroska file still declares the whole length while a decoder decodes what is left
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
    with ffmpeg_errors_as_corrupt(path, "not a readable media file"), av.open(str(path)) as container:
        if not container.streams.video:
            kinds = ", ".join(stream.type for stream in container.streams) or "none"
            raise NoVideoStreamError(path, f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        codec = stream.codec_context
        return _Probe(codec.width, codec.height, stream.frames, _declared_duration_s(container, stream))


class FrameReader(ABC):
    """One decoder's reading of one video: its frame index, built when it opens, then the frames at sampled
    indices. A reader raises `CorruptVideoError` for a file it cannot open or a frame it cannot decode."""

    name: str  # the decoder, as messages name it

    @abstractmethod
    def __len__(self) -> int:
        """Frames in the index."""

    @abstractmethod
    def timestamps(self) -> np.ndarray:
        """`[N, 2]` float32 start and stop seconds of every frame, in presentation order."""

    @abstractmethod
    def average_fps(self) -> float:
        """The stream's declared average frame rate."""

    @abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray:
        """`[K, H, W, 3]` upright RGB frames at sorted unique `indices` into the index."""

    @abstractmethod
    def close(self) -> None:
        """Release the file and the decoder now, not when the reader is collected (a traceback can hold it)."""

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DECODERS = CHOICES["data.decoder"]
_READERS = {"decord": "hvd.data.decord_reader:DecordReader", "pyav": "hvd.data.pyav_reader:PyAVReader"}


def choose_decoder(choice: str) -> str:
    """The decoder `data.decoder=choice` means in this process, `decord` or `pyav`.

    `auto` takes decord where it imports and PyAV (whose wheels ship their own FFmpeg) where it does not, e.g. on
    a platform without a decord wheel; an explicit `decord` that does not import is refused. Importing it is the
    test: an installed decord whose native library does not load counts as missing.
    """
    check_values({"data.decoder": choice})
    if choice == "pyav":
        return choice
    try:
        importlib.import_module("decord")
    except (ImportError, OSError, RuntimeError) as err:  # RuntimeError: decord's own "cannot find the library"
        if choice == "decord":
            raise ConfigError(
                f"data.decoder=decord, but decord does not import here ({last_line(err)}): install it, or set "
                "data.decoder=pyav (or auto) to decode with PyAV"
            ) from None
        return "pyav"
    return "decord"


def _reader_class(decoder: str) -> type[FrameReader]:
    module, name = _READERS[decoder].split(":")
    return getattr(importlib.import_module(module), name)


def open_reader(decoder: str, path: Path) -> FrameReader:
    """`path` opened by `decoder`'s reader (`choose_decoder`'s answer); its module, and decord with it, is
    imported only here, so choosing PyAV never loads decord."""
    return _reader_class(decoder)(path)


class ClipDecoder:
    """`decode_clip` reading with `data.decoder=choice`, as prepare hands it to its decode children.

    Unpickled in a child it chooses again, so `auto` takes what imports on that node, and imports that reader:
    its native libraries load before the child's memory limit (`hvd.data.decoder_process`), and an explicit
    decord that does not import there stops the child's start, and the job, instead of failing every video.
    """

    def __init__(self, choice: str):
        self.choice = choice
        self.decoder = choose_decoder(choice)
        _reader_class(self.decoder)  # imported now: in a decode child, before its memory limit

    def __call__(self, path: str | Path, spec: FrameSpec, limits: VideoLimits) -> DecodedClip:
        return decode_clip(path, spec, limits, self.decoder)

    def __reduce__(self) -> tuple[type[ClipDecoder], tuple[str]]:
        return ClipDecoder, (self.choice,)


def decode_clip(
    path: str | Path, spec: FrameSpec, limits: VideoLimits = VideoLimits(), decoder: str = "auto"
) -> DecodedClip:
    """Sample, resize and encode `spec.num_frames` frames of one video, read by `decoder` (`data.decoder`'s
    values); every failure of the video is a `VideoDecodeError`.

    A video past `limits` is refused from its header, then from the reader's frame index and timestamps,
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
    with open_reader(choose_decoder(decoder), path) as reader:
        num_source = len(reader)
        if num_source == 0:
            raise CorruptVideoError(path, "video stream holds no frames")
        limits.check(path, "max_video_frames", num_source, f"frame count in {reader.name}'s index")
        timestamps = reader.timestamps()
        # What the timestamps span bounds the arrays `fps` sampling sizes from them (one entry per second).
        span = float(timestamps.max() - timestamps.min())
        limits.check(path, "max_video_duration_s", span, "timestamps' span in seconds")
        covered = float(timestamps[-1, 1] - timestamps[0, 0])
        declared = probe.duration_s if spec.min_duration_fraction > 0 else None  # 0: the check is off
        truncated = declared is not None and covered < spec.min_duration_fraction * declared
        if truncated and not spec.keep_truncated:
            raise TruncatedVideoError(
                path, f"its frames cover {covered:.2f} s of the {declared:.2f} s its container declares (below "
                f"data.min_duration_fraction={spec.min_duration_fraction}); data.keep_truncated=true keeps such "
                "clips"
            )
        indices = sample_indices(spec.sample_mode, timestamps[:, 0], spec.num_frames)
        sampled = reader.read(indices)
        source_fps = reader.average_fps()
    frames = [resize_and_crop(frame, spec.frame_size) for frame in sampled]
    blank = np.zeros((spec.frame_size, spec.frame_size, 3), np.uint8)
    frames += [blank] * (spec.num_frames - len(frames))
    return DecodedClip(
        frames=[encode_frame(frame, spec.frame_codec, spec.jpeg_quality) for frame in frames],
        valid_frames=len(indices),
        frame_indices=indices.tolist(),
        timestamps_s=timestamps[indices, 0].tolist(),
        source_frames=num_source,
        source_fps=source_fps,
        duration_s=covered,
        truncated=truncated,
    )
