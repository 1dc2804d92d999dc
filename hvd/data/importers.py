"""Importers: each public text-video benchmark's own annotation files -> the common manifest.

One small function per benchmark, registered in `IMPORTERS`. Each reads the files the way the peers
(CLIP4Clip, X-Pool) read them, takes its options as keyword arguments with string values, and returns
entries with absolute video paths plus the ids whose video is not on disk. `import_benchmark` checks
the options, writes the manifest with paths relative to its folder and reports what is missing.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvd.data.manifest import SPLITS, ManifestEntry, write_manifest
from hvd.errors import InputError

# Preference order when one video exists in several encodings (a .webm re-encoded to .mp4).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")

Captions = dict[str, list[str]]  # video id -> captions, in annotation order
Layout = Callable[[str], tuple[str, tuple[str, ...]]]  # video id -> (usual relative path, file stems to try)


class BenchmarkError(InputError, ValueError):
    """Annotations, options or folders an importer cannot use; the message names the file or option."""


@dataclass
class Imported:
    entries: list[ManifestEntry]  # paths absolute; missing videos kept at their expected path
    missing: list[str]  # ids listed in the annotations with no video file on disk


@dataclass
class _Split:
    name: str  # train | val | test
    source: str  # the annotation file(s) it came from, for error messages
    captions: Captions


class VideoFinder:
    """Finds a listed video at the benchmark's usual path, else by file stem anywhere under the folder.

    Downloads get re-encoded (.webm -> .mp4), unpacked into sub-folders or renamed (`v_` dropped), so an
    exact path alone would report videos missing that are there.
    """

    def __init__(self, root: Path):
        self.root = root
        self._index: dict[str, Path] | None = None

    def find(self, expected: str, stems: Sequence[str]) -> Path | None:
        path = self.root / expected
        if path.is_file():
            return path
        index = self._by_stem()
        return next((index[stem] for stem in stems if stem in index), None)

    def _by_stem(self) -> dict[str, Path]:
        if self._index is None:
            files = [p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
            files.sort(key=lambda p: (VIDEO_EXTENSIONS.index(p.suffix.lower()), p))
            self._index = {}
            for path in files:
                self._index.setdefault(path.relative_to(self.root).with_suffix("").as_posix(), path)
                self._index.setdefault(path.stem, path)
        return self._index


def _first(ids: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(ids[:count])
    return shown + (f", ... ({len(ids) - count} more)" if len(ids) > count else "")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise BenchmarkError(f"annotation file not found: {path} (expected {path.name} in {path.parent})")
    return path


def _read_json(path: Path, kind: type) -> Any:
    try:
        data = json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, kind):
        expected = "object" if kind is dict else "list"
        raise BenchmarkError(
            f"{path}: expected a JSON {expected} at the top level, got {type(data).__name__}"
        )
    return data


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    with _require(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise BenchmarkError(
                f"{path}: missing column(s) {', '.join(absent)}; header is {reader.fieldnames}"
            )
        rows = list(reader)
    if not rows:
        raise BenchmarkError(f"{path}: no rows under the header")
    return rows


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _require(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _field(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise BenchmarkError(f"{where}: expected an object with key {key!r}, got {str(record)[:80]}")
    return record[key]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: expected a caption string, got {type(value).__name__}")
    return value


def _texts(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BenchmarkError(f"{where}: expected a list of caption strings, got {type(value).__name__}")
    return [_text(item, where) for item in value]


def _group(pairs: Iterable[tuple[str, str]]) -> Captions:
    grouped: Captions = {}
    for video_id, caption in pairs:
        grouped.setdefault(video_id, []).append(caption)
    return grouped


def _choice(benchmark: str, option: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise BenchmarkError(f"{benchmark}: option {option}={value!r} is not one of {', '.join(allowed)}")
    return value


def _flat(extension: str) -> Layout:
    return lambda video_id: (video_id + extension, (video_id,))


def _named(video_id: str) -> tuple[str, tuple[str, ...]]:
    """Ids that already carry a file name (DiDeMo, user folders); a re-encoded copy matches by stem."""
    return video_id, (video_id, os.path.splitext(video_id)[0])


def _assemble(videos: Path, splits: Sequence[_Split], layout: Layout, paragraph: bool = False) -> Imported:
    """Entries in annotation order; `paragraph` joins a video's captions into one, as paragraph retrieval does."""
    finder = VideoFinder(videos)
    entries: list[ManifestEntry] = []
    missing: list[str] = []
    seen: dict[str, str] = {}
    for split in splits:
        for video_id, captions in split.captions.items():
            if not isinstance(video_id, str) or not video_id:
                raise BenchmarkError(f"{split.source}: video id {video_id!r} is not a non-empty string")
            if video_id in seen:
                raise BenchmarkError(
                    f"video {video_id!r} is listed in both {seen[video_id]} and {split.source}"
                )
            seen[video_id] = split.source
            texts = [text for text in (" ".join(caption.split()) for caption in captions) if text]
            if paragraph and texts:
                texts = [" ".join(texts)]
            if not texts:
                raise BenchmarkError(f"{split.source}: video {video_id!r} has only empty captions")
            expected, stems = layout(video_id)
            path = finder.find(expected, stems)
            if path is None:
                missing.append(video_id)
                path = videos / expected
            entries.append(ManifestEntry(video_id=video_id, path=str(path), captions=texts, split=split.name))
    return Imported(entries=entries, missing=missing)


def msrvtt(annotations: Path, videos: Path, *, train_split: str = "9k") -> Imported:
    """MSR-VTT 1k-A: MSRVTT_train.{9k,7k}.csv + MSRVTT_data.json train, MSRVTT_JSFUSION_test.csv test.

    Train videos get all their captions, the 1k test videos one each. There is no val split: peers
    validate on the 1k-A test itself, and a video may sit in only one split of a manifest.
    """
    _choice("msrvtt", "train_split", train_split, ("9k", "7k"))
    train_csv = annotations / f"MSRVTT_train.{train_split}.csv"
    train_ids = list(dict.fromkeys(row["video_id"] for row in _read_csv(train_csv, ("video_id",))))
    data_json = annotations / "MSRVTT_data.json"
    sentences = _field(_read_json(data_json, dict), "sentences", str(data_json))
    wanted = set(train_ids)
    where = f"{data_json}: sentences"
    by_video: Captions = {}
    for sentence in sentences:
        video_id = _field(sentence, "video_id", where)
        if video_id in wanted:
            by_video.setdefault(video_id, []).append(_text(_field(sentence, "caption", where), where))
    uncaptioned = [v for v in train_ids if v not in by_video]
    if uncaptioned:
        raise BenchmarkError(
            f"{data_json}: no sentences for {len(uncaptioned)} videos of {train_csv.name}: {_first(uncaptioned)}"
        )
    test_csv = annotations / "MSRVTT_JSFUSION_test.csv"
    test = _group((row["video_id"], row["sentence"]) for row in _read_csv(test_csv, ("video_id", "sentence")))
    splits = [
        _Split("train", f"{train_csv.name} + {data_json.name}", {v: by_video[v] for v in train_ids}),
        _Split("test", test_csv.name, test),
    ]
    return _assemble(videos, splits, _flat(".mp4"))


def msvd(annotations: Path, videos: Path) -> Imported:
    """MSVD: captions_msvd.json with {train,val,test}_list.txt; val_list.txt is optional (X-Pool ships none)."""
    captions_json = annotations / "captions_msvd.json"
    captions = _read_json(captions_json, dict)
    splits = []
    for split in SPLITS:
        listing = annotations / f"{split}_list.txt"
        if split == "val" and not listing.exists():
            continue
        ids = list(dict.fromkeys(_read_lines(listing)))
        unknown = [v for v in ids if v not in captions]
        if unknown:
            raise BenchmarkError(
                f"{captions_json}: no captions for {len(unknown)} videos of {listing.name}: {_first(unknown)}"
            )
        chosen = {v: _texts(captions[v], f"{captions_json}: {v!r}") for v in ids}
        splits.append(_Split(split, listing.name, chosen))
    return _assemble(videos, splits, _flat(".avi"))


def didemo(annotations: Path, videos: Path) -> Imported:
    """DiDeMo paragraph retrieval: {train,val,test}_data.json, a video's descriptions joined into one caption."""
    splits = []
    for split in SPLITS:
        data_json = annotations / f"{split}_data.json"
        where = f"{data_json}: entry"
        items = _read_json(data_json, list)
        pairs = ((_field(it, "video", where), _text(_field(it, "description", where), where)) for it in items)
        splits.append(_Split(split, data_json.name, _group(pairs)))
    return _assemble(videos, splits, _named, paragraph=True)


def activitynet(annotations: Path, videos: Path) -> Imported:
    """ActivityNet Captions paragraph retrieval: train.json to train on, val_1.json as the test split."""
    splits = []
    for split, name in (("train", "train.json"), ("test", "val_1.json")):
        data_json = annotations / name
        data = _read_json(data_json, dict)
        captions = {
            video_id: _texts(
                _field(record, "sentences", f"{data_json}: {video_id!r}"), f"{data_json}: {video_id!r}"
            )
            for video_id, record in data.items()
        }
        splits.append(_Split(split, name, captions))
    return _assemble(videos, splits, lambda v: (v + ".mp4", (v, v.removeprefix("v_"))), paragraph=True)


LSMDC_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv"}
LSMDC_TEST_FILES = {"1k": "LSMDC16_challenge_1000_publictect.csv", "full": "LSMDC16_annos_test.csv"}


def _read_lsmdc(path: Path) -> Captions:
    """Tab-separated `clip_id, start/end aligned, start/end extracted, sentence`; clip ids repeat."""
    pairs = []
    for number, line in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            raise BenchmarkError(
                f"{path}:{number}: expected 6 tab-separated fields (clip id, 4 times, sentence), got {len(fields)}"
            )
        pairs.append((fields[0].strip(), fields[5]))
    if not pairs:
        raise BenchmarkError(f"{path}: no annotation lines")
    return _group(pairs)


def lsmdc(annotations: Path, videos: Path, *, test_split: str = "1k") -> Imported:
    """LSMDC: LSMDC16_annos_{training,val}.csv, test LSMDC16_challenge_1000_publictect.csv (or _annos_test).

    test_split=1k is the 1,000-clip test all peers report on; test_split=full reads LSMDC16_annos_test.csv.

    Clips live in one folder per movie: `<movie>/<clip_id>.avi`, the movie being the clip id before its
    last `_`.
    """
    _choice("lsmdc", "test_split", test_split, tuple(LSMDC_TEST_FILES))
    files = {**LSMDC_FILES, "test": LSMDC_TEST_FILES[test_split]}
    splits = [_Split(split, name, _read_lsmdc(annotations / name)) for split, name in files.items()]
    return _assemble(videos, splits, lambda v: (f"{v.rsplit('_', 1)[0]}/{v}.avi", (v,)))


def vatex(annotations: Path, videos: Path) -> Imported:
    """VATEX, English captions: vatex_training_v1.0.json train, vatex_validation_v1.0.json (3,000 clips) test."""
    splits = []
    for split, name in (("train", "vatex_training_v1.0.json"), ("test", "vatex_validation_v1.0.json")):
        data_json = annotations / name
        where = f"{data_json}: entry"
        captions: Captions = {}
        for item in _read_json(data_json, list):
            captions.setdefault(_field(item, "videoID", where), []).extend(
                _texts(_field(item, "enCap", where), where)
            )
        splits.append(_Split(split, name, captions))
    return _assemble(videos, splits, _flat(".mp4"))


def folder(
    annotations: Path, videos: Path, *, captions: str = "captions.csv", split: str | None = None
) -> Imported:
    """Your own benchmark: videos under --videos, a CSV `video_id,caption[,split]` with a row per caption.

    `video_id` is a file name, or a stem, relative to the videos folder. The option split=train|val|test
    puts every video in that one split; without it the CSV needs the split column.
    """
    captions_csv = annotations / captions
    rows = _read_csv(captions_csv, ("video_id", "caption"))
    if split is None and "split" not in rows[0]:
        raise BenchmarkError(
            f"{captions_csv}: no 'split' column; add one (train|val|test) or pass --option split=NAME"
        )
    if split is not None:
        _choice("folder", "split", split, SPLITS)
    by_split: dict[str, Captions] = {name: {} for name in SPLITS}
    split_of: dict[str, str] = {}
    for row in rows:
        video_id, row_split = (row["video_id"] or "").strip(), split or (row["split"] or "").strip()
        if not video_id:
            raise BenchmarkError(f"{captions_csv}: a row has an empty video_id")
        if row_split not in SPLITS:
            raise BenchmarkError(
                f"{captions_csv}: video {video_id!r} has split {row_split!r}, expected one of {', '.join(SPLITS)}"
            )
        if split_of.setdefault(video_id, row_split) != row_split:
            raise BenchmarkError(
                f"{captions_csv}: video {video_id!r} is in both {split_of[video_id]} and {row_split}"
            )
        by_split[row_split].setdefault(video_id, []).append(row["caption"] or "")
    splits = [_Split(name, captions_csv.name, by_split[name]) for name in SPLITS]
    return _assemble(videos, splits, _named)


IMPORTERS: dict[str, Callable[..., Imported]] = {
    "msrvtt": msrvtt,
    "msvd": msvd,
    "didemo": didemo,
    "activitynet": activitynet,
    "lsmdc": lsmdc,
    "vatex": vatex,
    "folder": folder,
}


def importer_options(name: str) -> dict[str, str | None]:
    """An importer's options and their defaults, read from its keyword-only parameters."""
    parameters = inspect.signature(IMPORTERS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def describe_importers() -> str:
    """The `--help` text: every benchmark, what it reads and its options."""
    lines = ["benchmarks:"]
    for name, importer in IMPORTERS.items():
        lines.append(f"  {name:<12} {inspect.getdoc(importer).splitlines()[0]}")
        options = [
            key if default is None else f"{key}={default}" for key, default in importer_options(name).items()
        ]
        if options:
            lines.append(f"  {'':<12} options: {', '.join(options)}")
    return "\n".join(lines)


@dataclass
class ImportReport:
    benchmark: str
    manifest: Path
    entries: list[ManifestEntry]  # as written, paths relative to the manifest
    missing: list[str]
    dropped_missing: bool

    def summary(self) -> str:
        lines = [f"{self.benchmark}: {len(self.entries)} videos -> {self.manifest}"]
        for split in SPLITS:
            chosen = [e for e in self.entries if e.split == split]
            captions = sum(len(e.captions) for e in chosen)
            lines.append(f"  {split:<5} {len(chosen):>7} videos {captions:>8} captions")
        where = (
            "left out of the manifest"
            if self.dropped_missing
            else "kept in the manifest; prepare quarantines them"
        )
        detail = f" ({_first(self.missing)}); {where}" if self.missing else ""
        lines.append(f"  missing on disk: {len(self.missing)}{detail}")
        return "\n".join(lines)


def import_benchmark(
    name: str,
    annotations: str | Path,
    videos: str | Path,
    out: str | Path,
    options: Mapping[str, str] | None = None,
    drop_missing: bool = False,
) -> ImportReport:
    """Run one importer and write its manifest; a folder holding none of the listed videos is an error."""
    if name not in IMPORTERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose one of {', '.join(IMPORTERS)}")
    options = dict(options or {})
    known = importer_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) or "none"
        raise BenchmarkError(f"{name}: unknown option(s) {', '.join(unknown)} (valid: {valid})")
    annotations, videos, out = Path(annotations), Path(videos), Path(out)
    for role, folder_path in (("annotations", annotations), ("videos", videos)):
        if not folder_path.is_dir():
            raise BenchmarkError(f"{role} folder not found: {folder_path}")
    imported = IMPORTERS[name](annotations, videos, **options)
    if not imported.entries:
        raise BenchmarkError(f"{name}: the annotations in {annotations} list no videos")
    if len(imported.missing) == len(imported.entries):
        raise BenchmarkError(
            f"{name}: none of the {len(imported.entries)} listed videos is under {videos} "
            f"(the first would be {imported.entries[0].path})"
        )
    missing = set(imported.missing)
    root = out.resolve().parent
    entries = [
        ManifestEntry(e.video_id, os.path.relpath(Path(e.path).resolve(), root), e.captions, e.split, e.extra)
        for e in imported.entries
        if not (drop_missing and e.video_id in missing)
    ]
    write_manifest(entries, out)
    return ImportReport(name, out, entries, imported.missing, drop_missing)
