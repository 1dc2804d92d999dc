"""Read one video's frame index and frames with decord: `data.decoder=decord`, and `auto` where decord imports.

decord builds its frame index (an entry per packet, in presentation order, float32 start and stop times) when
it opens a file. Frames of a clip with several keyframes are read by `PyAVReader.seek`, which decodes less
(docs/benchmarks.md, "Decode cost on long clips") and gives the same pixels; a one-GOP clip is decoded
straight through by decord, which is cheaper there. Rotation: decord 0.6 reads the container's display matrix
and returns 90/180/270 degree clips upright; it ignores the mirroring part, which phones do not write.
"""

from __future__ import annotations

from pathlib import Path

import av
import decord
import numpy as np

from hvd.data.decode import CorruptVideoError, FrameReader, last_line
from hvd.data.pyav_reader import PyAVReader


class DecordReader(FrameReader):
    """decord's index of a video, then its frames: PyAV's seeking where it saves work, else decord's own."""

    name = "decord"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.reader = decord.VideoReader(str(path), num_threads=1)
        except (decord.DECORDError, RuntimeError) as err:
            raise CorruptVideoError(path, f"decord cannot open it ({last_line(err)})") from None

    def __len__(self) -> int:
        return len(self.reader)

    def timestamps(self) -> np.ndarray:
        return self.reader.get_frame_timestamp(np.arange(len(self.reader)))

    def average_fps(self) -> float:
        return float(self.reader.get_avg_fps())

    def read(self, indices: np.ndarray) -> np.ndarray:
        if len(self.reader.get_key_indices()) > 1:
            with PyAVReader(self.path) as seeker:  # its index must be decord's for the indices to mean the same
                sampled = seeker.seek(indices) if len(seeker) == len(self) else None
            if sampled is not None:
                return sampled
        return self._get_batch(indices)

    def _get_batch(self, indices: np.ndarray) -> np.ndarray:
        """decord's frames at `indices`. decord 0.6 pads the rows of some frame widths (16, 24, 48, 72 px among
        others) and then fails to batch them (dmlc/decord#336); single frames still arrive, padded, and are
        trimmed to the real width."""
        try:
            return self.reader.get_batch(indices.tolist()).asnumpy()
        except decord.DECORDError as batch_error:
            frames = []
            for index in indices.tolist():
                try:
                    frame = self.reader[index].asnumpy()
                except decord.DECORDError as err:
                    raise CorruptVideoError(self.path, f"frame {index} does not decode ({last_line(err)})") from None
                if frame.shape[2] != 3:
                    width = self._display_width(frame.shape[0])
                    if frame.shape[1] * frame.shape[2] < width * 3:
                        raise CorruptVideoError(self.path, f"frame {index}: {last_line(batch_error)}") from None
                    frame = frame.reshape(frame.shape[0], -1)[:, : width * 3].reshape(frame.shape[0], width, 3)
                frames.append(frame)
            return np.stack(frames)

    def close(self) -> None:
        del self.reader  # decord frees its native reader, and the file with it, when its object goes

    def _display_width(self, display_height: int) -> int:
        with av.open(str(self.path)) as container:
            codec = container.streams.video[0].codec_context
            return codec.width if codec.height == display_height else codec.height
