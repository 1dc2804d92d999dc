"""The common benchmark format: one JSON object per video in a `.jsonl` manifest.

`{"video_id": str, "path": str, "captions": [str, ...], "split": "train"|"val"|"test"}`; `path` is
relative to the manifest's folder (or absolute). Extra keys are kept and passed through.
Every importer writes this format and every later stage reads only this format.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hvd.errors import InputError

SPLITS = ("train", "val", "test")


class ManifestError(InputError, ValueError):
    """A manifest line that breaks the format; the message names the file and line."""


@dataclass
class ManifestEntry:
    video_id: str
    path: str
    captions: list[str]
    split: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        record = {k: v for k, v in asdict(self).items() if k != "extra"}
        record.update(self.extra)
        return json.dumps(record, sort_keys=False, ensure_ascii=False)


def _parse_line(line: str, where: str) -> ManifestEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    for key in ("video_id", "path", "captions", "split"):
        if key not in record:
            raise ManifestError(f"{where}: missing key '{key}'")
    captions = record.pop("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
        raise ManifestError(f"{where}: 'captions' must be a non-empty list of non-empty strings")
    split = record.pop("split")
    if split not in SPLITS:
        raise ManifestError(f"{where}: 'split' is {split!r}, expected one of {', '.join(SPLITS)}")
    video_id, path = str(record.pop("video_id")), str(record.pop("path"))
    return ManifestEntry(video_id=video_id, path=path, captions=captions, split=split, extra=record)


def _lines(path: Path, digest: Any = None) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) of every non-blank line, read as a stream; every byte read also
    goes into `digest` when given, so one pass both parses and fingerprints."""
    with path.open("rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            if raw.strip():
                yield number, offset, raw.decode("utf-8")
            offset += len(raw)


def _id_hash(video_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "little", signed=True)


@dataclass
class ManifestIndex:
    """Where a manifest's videos start, found in one streaming pass: 16 bytes per video in memory, so a
    manifest of millions of lines is validated and split into byte ranges without holding its entries."""

    path: Path
    offsets: array  # byte offset of each selected video's line, in file order
    end: int  # the file's size
    fingerprint: str

    def __len__(self) -> int:
        return len(self.offsets)

    def ranges(self, per_range: int) -> list[tuple[int, int]]:
        """Byte ranges holding `per_range` selected videos each (the last may hold fewer)."""
        starts = list(self.offsets[::per_range])
        return list(zip(starts, [*starts[1:], self.end], strict=True))


def index_manifest(path: str | Path, splits: Iterable[str] | None = None) -> ManifestIndex:
    """Validate every line (format errors and duplicate ids name the line) and index the videos of `splits`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    wanted = set(splits) if splits is not None else set(SPLITS)
    offsets, hashes, lines, digest = array("q"), array("q"), 0, hashlib.sha256()
    for number, offset, line in _lines(path, digest):
        entry = _parse_line(line, f"{path}:{number}")
        hashes.append(_id_hash(entry.video_id))
        lines += 1
        if entry.split in wanted:
            offsets.append(offset)
    if not lines:
        raise ManifestError(f"{path}: manifest holds no videos")
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    if (ordered[1:] == ordered[:-1]).any():
        read_manifest(path)  # names the duplicate and its lines (a hash collision alone passes)
    return ManifestIndex(path, offsets, path.stat().st_size, digest.hexdigest()[:16])  # as `fingerprint`


def read_manifest_range(path: str | Path, start: int, end: int, splits: Iterable[str] | None = None) -> list[ManifestEntry]:
    """The entries of `splits` whose lines start in bytes [start, end) of a manifest `index_manifest` validated."""
    wanted = set(splits) if splits is not None else set(SPLITS)
    with Path(path).open("rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode("utf-8")
    entries = (_parse_line(line, f"{path}@{start}") for line in text.splitlines() if line.strip())
    return [entry for entry in entries if entry.split in wanted]


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read and validate a manifest; duplicate ids and format errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for number, _, line in _lines(path):
        where = f"{path}:{number}"
        entry = _parse_line(line, where)
        if entry.video_id in seen:
            raise ManifestError(f"{where}: duplicate video_id {entry.video_id!r} (first on line {seen[entry.video_id]})")
        seen[entry.video_id] = number
        entries.append(entry)
    if not entries:
        raise ManifestError(f"{path}: manifest holds no videos")
    return entries


def write_manifest(entries: Iterable[ManifestEntry], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(entry.to_json() + "\n")
    return path


def resolve_video_path(entry: ManifestEntry, manifest_path: str | Path) -> Path:
    video = Path(entry.path)
    return video if video.is_absolute() else Path(manifest_path).resolve().parent / video


def fingerprint(path: str | Path) -> str:
    """Content hash of the manifest, so prepared shards know exactly which benchmark they hold."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]
