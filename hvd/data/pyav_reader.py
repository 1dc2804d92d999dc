"""Read one video's frame index and frames with PyAV, whose wheels ship their own FFmpeg: `data.decoder=pyav`,
and the seeking path the decord reader takes on clips with several keyframes.

The index is the one decord builds when it opens a file: an entry per packet of the video stream, in
presentation order, a frame starting at `(pts - start_time) * time_base` and stopping `duration` later,
rounded to float32 as decord stores them; so both readers hand the sampler the same numbers and it picks the
same frames. Rotation: a frame whose display matrix turns it by a multiple of 90 degrees (PyAV's
`VideoFrame.rotation`, read from the stream's side data) is turned upright, as decord turns it; the mirroring
part of a display matrix, which phones do not write, and other angles are ignored.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from hvd.data.decode import CorruptVideoError, FrameReader, ffmpeg_errors_as_corrupt


class PyAVReader(FrameReader):
    """A video's frame index, read from its packets when it is opened, then its frames, decoded single-threaded."""

    name = "PyAV"

    def __init__(self, path: Path):
        self.path = path
        with ffmpeg_errors_as_corrupt(path, "PyAV cannot open it"):
            self.container = av.open(str(path))
            try:
                self.stream = self.container.streams.video[0]
                self.stream.codec_context.thread_count = 1
                packets = sorted(
                    (packet.pts, packet.duration or 0, packet.is_keyframe)
                    for packet in self.container.demux(self.stream)
                    if packet.pts is not None and packet.size  # not the empty packets that flush the decoder
                )
            except BaseException:
                self.container.close()
                raise
        self.pts = [pts for pts, _, _ in packets]  # presentation order
        self.keyframes = [pts for pts, _, keyframe in packets if keyframe]
        pts, durations = np.array(self.pts, np.int64), np.array([duration for _, duration, _ in packets], np.int64)
        seconds_per_tick = float(self.stream.time_base) if self.stream.time_base else 0.0
        start = pts - (self.stream.start_time or 0)
        self.starts_stops = np.stack([start * seconds_per_tick, (start + durations) * seconds_per_tick], axis=-1)
        # One for all frames: `VideoFrame.to_ndarray` builds a conversion context per frame, 0.4 ms at 64 px.
        self.reformatter = VideoReformatter()

    def __len__(self) -> int:
        return len(self.pts)

    def timestamps(self) -> np.ndarray:
        return self.starts_stops.astype(np.float32)

    def average_fps(self) -> float:
        rate = self.stream.average_rate
        return float(rate) if rate else 0.0

    def read(self, indices: np.ndarray) -> np.ndarray:
        frames = self.seek(indices)
        return frames if frames is not None else self._decode_through(indices)

    def seek(self, indices: np.ndarray) -> np.ndarray | None:
        """`[K, H, W, 3]` RGB frames at sorted unique presentation `indices`, decoding as little as exactness allows.

        For each sample the decoder jumps to the keyframe before it, unless it is already inside that keyframe's
        group (one-GOP clips decode straight through once); frames before the sample that no other frame
        references (`skip_frame=NONREF`) are not decoded at all. decord's random access decodes and converts
        every frame from the keyframe on, about twice the work on clips with a keyframe every few seconds.
        None when a sample is not among the frames the decoder puts out at its packet's time, or no packet is
        marked a keyframe.
        """
        if not self.keyframes:
            return None
        context = self.stream.codec_context
        target, frames, position, decoded = 0, [], None, iter(())

        def decode_from_here() -> Iterator[av.VideoFrame]:  # presentation order; unreferenced ones before target skipped
            for packet in self.container.demux(self.stream):
                context.skip_frame = "NONREF" if packet.pts is not None and packet.pts < target else "DEFAULT"
                yield from context.decode(packet)

        for index in indices.tolist():
            target = self.pts[index]
            key = self.keyframes[max(0, bisect.bisect_right(self.keyframes, target) - 1)]
            found = None
            with ffmpeg_errors_as_corrupt(self.path, f"frame {index} does not decode"):
                if position is None or position < key:  # the sample's keyframe lies ahead: jump there
                    self.container.seek(key, stream=self.stream, backward=True)
                    decoded = decode_from_here()
                for frame in decoded:
                    if frame.pts is None:
                        return None
                    position = frame.pts
                    if frame.pts >= target:
                        found = frame if frame.pts == target else None
                        break
            if found is None:
                return None
            frames.append(self._upright(found))
        return np.stack(frames)

    def _decode_through(self, indices: np.ndarray) -> np.ndarray:
        """The frames at `indices` counted as the decoder puts them out from the start, as decord counts: for
        streams whose frames do not carry their packets' times, or that drop a frame."""
        frames, wanted = [], indices.tolist()
        with ffmpeg_errors_as_corrupt(self.path, "its frames do not decode"), av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for position, frame in enumerate(container.decode(stream)):
                if position == wanted[len(frames)]:
                    frames.append(self._upright(frame))
                    if len(frames) == len(wanted):
                        return np.stack(frames)
        raise CorruptVideoError(self.path, f"frame {wanted[len(frames)]} does not decode (the stream ends before it)")

    def _upright(self, frame: av.VideoFrame) -> np.ndarray:
        image = self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        return np.rot90(image, k=frame.rotation // 90) if frame.rotation else image

    def close(self) -> None:
        self.container.close()
