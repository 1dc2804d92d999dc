"""The common benchmark format: one JSON object per video in a `.jsonl` manifest.

`{"video_id": str, "path": str, "captions": [str, ...], "split": "train"|"val"|"test"}`; `path` is
relative to the manifest's folder (or absolute). Extra keys are kept and passed through.
Every importer writes this format and every later stage reads only this format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
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


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read and validate a manifest; duplicate ids and format errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
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
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
