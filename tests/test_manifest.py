"""The manifest format: validation that names the line, and the streaming index prepare splits work by."""

import pytest

from hvd.data.manifest import (
    ManifestEntry,
    ManifestError,
    fingerprint,
    index_manifest,
    read_manifest,
    read_manifest_range,
    write_manifest,
)


def entries(count: int) -> list[ManifestEntry]:
    splits = ("train", "val", "test")
    return [ManifestEntry(f"v{i:03d}", f"videos/v{i}.mp4", [f"caption {i}"], splits[i % 3], {"n": i}) for i in range(count)]


def test_index_cuts_the_selected_videos_into_byte_ranges_that_read_back_exactly(tmp_path):
    manifest = write_manifest(entries(25), tmp_path / "manifest.jsonl")
    with manifest.open("a") as handle:
        handle.write("\n")  # a blank line at the end is allowed
    index = index_manifest(manifest, splits=("train", "test"))
    wanted = [e for e in read_manifest(manifest) if e.split in ("train", "test")]
    assert len(index) == len(wanted) == 17
    assert index.fingerprint == fingerprint(manifest)  # hashed in the same pass, the same value
    ranges = index.ranges(4)
    assert len(ranges) == 5 and ranges[-1][1] == manifest.stat().st_size
    parts = [read_manifest_range(manifest, start, end, ("train", "test")) for start, end in ranges]
    assert [len(part) for part in parts] == [4, 4, 4, 4, 1]
    assert [e for part in parts for e in part] == wanted  # extra keys and order kept


def test_index_names_the_line_of_a_bad_entry_or_a_duplicate_id(tmp_path):
    manifest = write_manifest(entries(5), tmp_path / "manifest.jsonl")
    lines = manifest.read_text().splitlines()
    (tmp_path / "dup.jsonl").write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(ManifestError, match=r"dup.jsonl:6: duplicate video_id 'v001' \(first on line 2\)"):
        index_manifest(tmp_path / "dup.jsonl")
    (tmp_path / "bad.jsonl").write_text("\n".join([*lines[:3], '{"video_id": "x"}']) + "\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:4: missing key 'path'"):
        index_manifest(tmp_path / "bad.jsonl")
