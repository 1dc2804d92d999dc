"""Benchmark importers on hand-written annotation files in each public format.

Videos are empty placeholder files: importers only check that a video exists, decoding is prepare's job.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hvd.data.importers import IMPORTERS, BenchmarkError, Imported, VideoFinder, import_benchmark
from hvd.data.manifest import read_manifest, resolve_video_path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"

# The files a complete download holds, in the layouts seen in the wild: re-encoded copies, sub-folders,
# ActivityNet ids without their `v_`.
VIDEOS = {
    "msrvtt": [
        "video0.mp4",
        "video1.mp4",
        "video2.mp4",
        "video3.mp4",
        "video7579.mp4",
        "video7725.mp4",
        "video9258.webm",
    ],
    "msvd": [
        "-4wsuPCjDBc_5_15.avi",
        "-7KMZQEsJW4_205_208.avi",
        "-8y1Q0rA3n8_108_115.avi",
        "-AwoiGR6c8M_10_14.avi",
        "-Cv5LsqKUXc_17_25.avi",
        "00jrXRMlZOY_0_10.avi",
    ],
    "didemo": [
        "10015567@N08_3655084291_d8b58466fa.mp4",
        "10039005@N03_5248181457_ec7e0a3d59.avi",
        "10092583@N03_6283457196_4dbd7e6ea8.mp4",
        "10134337@N03_5893446966_20ed6e2a39.m4v",
    ],
    "activitynet": [
        "v_QOlSCBRmfWY.mp4",
        "v_ehGHCYKzyZ8.mkv",
        "uqiMw7tQ1Cc.mp4",
        "v_bXdq2zI1Ms0.mp4",
        "v_FsS_NCZEfaI.webm",
    ],
    "lsmdc": [
        "0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi",
        "0001_American_Beauty/0001_American_Beauty_00.01.03.445-00.01.06.210.avi",
        "0002_As_Good_As_It_Gets/0002_As_Good_As_It_Gets_00.00.40.133-00.00.43.018.avi",
        "1010_TITANIC/1010_TITANIC_00.00.09.271-00.00.13.445.avi",
        "1004_Juno/1004_Juno_00.00.32.849-00.00.40.300.avi",
        "1004_Juno/1004_Juno_00.01.10.000-00.01.14.500.avi",
        "1004_Juno/1004_Juno_00.02.00.500-00.02.04.000.avi",
    ],
    "vatex": [
        "train/Ptf_2VRj-V0_000122_000132.mp4",
        "-_1YqDLz5sk_000010_000020.mp4",
        "G9zN5TTuGO4_000179_000189.mp4",
    ],
    "folder": ["kitchen_01.mp4", "garden/walk_02.webm", "street_03.mkv"],
}


def _videos(root: Path, name: str, skip: tuple[str, ...] = ()) -> Path:
    folder = root / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    for relative in VIDEOS[name]:
        if relative not in skip:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).touch()
    return folder


def _annotations(root: Path, name: str) -> Path:
    """A writable copy of a fixture folder, for tests that break a file."""
    return Path(shutil.copytree(FIXTURES / name, root / "annotations"))


def _import(tmp_path: Path, name: str, annotations: Path | None = None, **options: str) -> Imported:
    """Import against a complete download: every listed video must be found."""
    imported = IMPORTERS[name](annotations or FIXTURES / name, _videos(tmp_path, name), **options)
    assert imported.missing == []
    assert all(Path(e.path).is_file() for e in imported.entries)
    return imported


def _table(imported: Imported) -> dict[str, tuple[str, list[str], str]]:
    """video id -> (split, captions, file name)."""
    return {e.video_id: (e.split, e.captions, Path(e.path).name) for e in imported.entries}


def test_msrvtt_9k_train_gets_all_captions_and_jsfusion_test_one(tmp_path):
    assert _table(_import(tmp_path, "msrvtt")) == {
        "video0": (
            "train",
            ["a car is shown", "a cartoon character is driving", "the car is red"],
            "video0.mp4",
        ),
        "video1": ("train", ["a man drives a cartoon car"], "video1.mp4"),
        "video2": ("train", ["a woman is doing her makeup", "a person puts lipstick on"], "video2.mp4"),
        "video3": ("train", ["a band plays at a party"], "video3.mp4"),
        "video7579": (
            "test",
            ["a girl wearing red top and black trouser is putting a sweater on a dog"],
            "video7579.mp4",
        ),
        "video7725": (
            "test",
            ["young people sit around the edges of a room clapping and playing music, while a woman dances"],
            "video7725.mp4",
        ),
        "video9258": ("test", ["a man is talking about a car"], "video9258.webm"),
    }


def test_msrvtt_7k_train_split(tmp_path):
    imported = _import(tmp_path, "msrvtt", train_split="7k")
    assert [(e.video_id, e.split) for e in imported.entries if e.split == "train"] == [
        ("video0", "train"),
        ("video2", "train"),
    ]
    assert sum(e.split == "test" for e in imported.entries) == 3


def test_msvd_lists_give_splits_and_avi_files(tmp_path):
    table = _table(_import(tmp_path, "msvd"))
    assert {vid: split for vid, (split, _, _) in table.items()} == {
        "-4wsuPCjDBc_5_15": "train",
        "-7KMZQEsJW4_205_208": "train",
        "-8y1Q0rA3n8_108_115": "train",
        "-AwoiGR6c8M_10_14": "val",
        "-Cv5LsqKUXc_17_25": "test",
        "00jrXRMlZOY_0_10": "test",
    }
    assert table["-4wsuPCjDBc_5_15"][1:] == (
        ["a squirrel is eating a peanut in its shell", "a chipmunk is eating", "a squirrel eats"],
        "-4wsuPCjDBc_5_15.avi",
    )


def test_msvd_without_val_list_has_no_val_split(tmp_path):
    annotations = _annotations(tmp_path, "msvd")
    (annotations / "val_list.txt").unlink()
    imported = _import(tmp_path, "msvd", annotations)
    assert {e.split for e in imported.entries} == {"train", "test"}


def test_didemo_joins_descriptions_and_finds_mixed_extensions(tmp_path):
    assert _table(_import(tmp_path, "didemo")) == {
        "10015567@N08_3655084291_d8b58466fa.mov": (
            "train",
            ["a girl in a pink shirt walks into view the girl waves at the camera"],
            "10015567@N08_3655084291_d8b58466fa.mp4",  # re-encoded from .mov
        ),
        "10039005@N03_5248181457_ec7e0a3d59.avi": (
            "train",
            ["the camera zooms in on a red car"],
            "10039005@N03_5248181457_ec7e0a3d59.avi",
        ),
        "10092583@N03_6283457196_4dbd7e6ea8.mp4": (
            "val",
            ["a dog jumps into the lake"],
            "10092583@N03_6283457196_4dbd7e6ea8.mp4",
        ),
        "10134337@N03_5893446966_20ed6e2a39.m4v": (
            "test",
            ["people cheer in the stands a player scores a goal the crowd leaves"],
            "10134337@N03_5893446966_20ed6e2a39.m4v",
        ),
    }


def test_activitynet_paragraphs_train_and_val1_as_test(tmp_path):
    table = _table(_import(tmp_path, "activitynet"))
    assert {vid: (split, name) for vid, (split, _, name) in table.items()} == {
        "v_QOlSCBRmfWY": ("train", "v_QOlSCBRmfWY.mp4"),
        "v_ehGHCYKzyZ8": ("train", "v_ehGHCYKzyZ8.mkv"),
        "v_uqiMw7tQ1Cc": ("test", "uqiMw7tQ1Cc.mp4"),
        "v_bXdq2zI1Ms0": ("test", "v_bXdq2zI1Ms0.mp4"),
        "v_FsS_NCZEfaI": ("test", "v_FsS_NCZEfaI.webm"),
    }
    assert table["v_uqiMw7tQ1Cc"][1] == [
        "A weight lifting tutorial is given. The coach helps the guy in red with the proper body placement and lifting technique."
    ]


def test_lsmdc_groups_repeated_clips_in_movie_folders(tmp_path):
    table = _table(_import(tmp_path, "lsmdc"))
    beauty = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    assert table[beauty] == (
        "train",
        ["SOMEONE lies on his bed.", "He looks up at the ceiling."],
        beauty + ".avi",
    )
    assert [split for split, _, _ in table.values()] == ["train"] * 3 + ["val"] + ["test"] * 2
    full = _table(_import(tmp_path, "lsmdc", test_split="full"))
    assert [vid for vid, (split, _, _) in full.items() if split == "test"][
        -1
    ] == "1004_Juno_00.02.00.500-00.02.04.000"


def test_lsmdc_path_is_movie_folder_even_when_missing(tmp_path):
    videos = tmp_path / "empty"
    videos.mkdir()
    imported = IMPORTERS["lsmdc"](FIXTURES / "lsmdc", videos)
    clip = "1010_TITANIC_00.00.09.271-00.00.13.445"
    assert clip in imported.missing
    assert {Path(e.path) for e in imported.entries if e.video_id == clip} == {
        videos / "1010_TITANIC" / f"{clip}.avi"
    }


def test_vatex_english_captions_training_and_validation_as_test(tmp_path):
    assert _table(_import(tmp_path, "vatex")) == {
        "Ptf_2VRj-V0_000122_000132": (
            "train",
            ["People wearing harnesses climb a rock wall.", "A group of people climb a wall."],
            "Ptf_2VRj-V0_000122_000132.mp4",
        ),
        "-_1YqDLz5sk_000010_000020": (
            "train",
            ["A person is folding paper into a shape."],
            "-_1YqDLz5sk_000010_000020.mp4",
        ),
        "G9zN5TTuGO4_000179_000189": (
            "test",
            ["A man plays the drums on stage.", "Someone drums loudly."],
            "G9zN5TTuGO4_000179_000189.mp4",
        ),
    }


def test_folder_csv_with_split_column(tmp_path):
    assert _table(_import(tmp_path, "folder")) == {
        "kitchen_01.mp4": (
            "train",
            ["someone chops carrots on a board", "vegetables are cut, then fried"],
            "kitchen_01.mp4",
        ),
        "garden/walk_02": ("train", ["a dog runs across the lawn"], "walk_02.webm"),
        "street_03.mkv": ("test", ["cars wait at a red light"], "street_03.mkv"),
    }


def test_folder_without_split_column_needs_the_split_option(tmp_path):
    with pytest.raises(BenchmarkError, match=r"no_split\.csv: no 'split' column.*--option split="):
        _import(tmp_path, "folder", captions="no_split.csv")
    imported = _import(tmp_path, "folder", captions="no_split.csv", split="test")
    assert [(e.video_id, e.split) for e in imported.entries] == [
        ("kitchen_01.mp4", "test"),
        ("street_03.mkv", "test"),
    ]


def test_missing_videos_are_reported_kept_or_dropped(tmp_path):
    videos = _videos(tmp_path, "msrvtt", skip=("video3.mp4", "video7725.mp4"))
    out = tmp_path / "manifests" / "msrvtt.jsonl"
    report = import_benchmark("msrvtt", FIXTURES / "msrvtt", videos, out)
    assert report.missing == ["video3", "video7725"]
    assert "missing on disk: 2 (video3, video7725); kept in the manifest" in report.summary()
    entries = {e.video_id: e for e in read_manifest(out)}
    assert len(entries) == 7
    assert entries["video0"].path == "../videos/video0.mp4"
    assert resolve_video_path(entries["video0"], out).resolve() == (videos / "video0.mp4").resolve()
    assert not resolve_video_path(entries["video3"], out).exists()

    dropped = import_benchmark("msrvtt", FIXTURES / "msrvtt", videos, out, drop_missing=True)
    assert "left out of the manifest" in dropped.summary()
    assert sorted(e.video_id for e in read_manifest(out)) == [
        "video0",
        "video1",
        "video2",
        "video7579",
        "video9258",
    ]


def test_summary_counts_videos_and_captions_per_split(tmp_path):
    videos = _videos(tmp_path, "msrvtt", skip=tuple(VIDEOS["msrvtt"][1:]))
    summary = (
        import_benchmark("msrvtt", FIXTURES / "msrvtt", videos, tmp_path / "m.jsonl").summary().splitlines()
    )
    assert summary[1].split() == ["train", "4", "videos", "7", "captions"]
    assert summary[2].split() == ["val", "0", "videos", "0", "captions"]
    assert summary[3].split() == ["test", "3", "videos", "3", "captions"]
    assert summary[
        4
    ] == "  missing on disk: 6 (video1, video2, video3, video7579, video7725, ... (1 more)); " + (
        "kept in the manifest; prepare quarantines them"
    )


def test_no_listed_video_on_disk_is_an_error(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(BenchmarkError, match=r"none of the 7 listed videos is under .*elsewhere"):
        import_benchmark("msrvtt", FIXTURES / "msrvtt", tmp_path / "elsewhere", tmp_path / "m.jsonl")


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("msrvtt", "MSRVTT_train.9k.csv"),
        ("msrvtt", "MSRVTT_data.json"),
        ("msrvtt", "MSRVTT_JSFUSION_test.csv"),
        ("msvd", "captions_msvd.json"),
        ("msvd", "test_list.txt"),
        ("didemo", "val_data.json"),
        ("activitynet", "val_1.json"),
        ("lsmdc", "LSMDC16_challenge_1000_publictect.csv"),
        ("vatex", "vatex_training_v1.0.json"),
        ("folder", "captions.csv"),
    ],
)
def test_missing_annotation_file_is_named(tmp_path, name, file):
    annotations = _annotations(tmp_path, name)
    (annotations / file).unlink()
    with pytest.raises(BenchmarkError, match=rf"annotation file not found: .*{file} \(expected {file} in "):
        _import(tmp_path, name, annotations)


def _sentences_without(video_id: str) -> str:
    data = json.loads((FIXTURES / "msrvtt" / "MSRVTT_data.json").read_text())
    data["sentences"] = [s for s in data["sentences"] if s["video_id"] != video_id]
    return json.dumps(data)


@pytest.mark.parametrize(
    ("name", "file", "content", "message"),
    [
        ("msrvtt", "MSRVTT_data.json", "{not json", r"MSRVTT_data\.json: not valid JSON"),
        (
            "msrvtt",
            "MSRVTT_data.json",
            _sentences_without("video3"),
            r"no sentences for 1 videos of MSRVTT_train\.9k\.csv: video3",
        ),
        (
            "msrvtt",
            "MSRVTT_JSFUSION_test.csv",
            "key,vid_key,video,sentence\nret0,msr1,video1,a\n",
            r"missing column\(s\) video_id",
        ),
        (
            "msvd",
            "test_list.txt",
            "unknown_clip_1_2\n",
            r"captions_msvd\.json: no captions for 1 videos of test_list\.txt",
        ),
        (
            "didemo",
            "test_data.json",
            '[{"video": "a.mp4", "times": []}]',
            r"test_data\.json: entry: expected an object with key 'description'",
        ),
        (
            "vatex",
            "vatex_training_v1.0.json",
            '[{"videoID": 17, "enCap": ["x"]}]',
            r"vatex_training_v1\.0\.json: video id 17 is not a non-empty string",
        ),
        (
            "activitynet",
            "train.json",
            "[]",
            r"train\.json: expected a JSON object at the top level, got list",
        ),
        (
            "lsmdc",
            "LSMDC16_annos_val.csv",
            "clip_1\t0\t1\t0\t1\tok\nclip_2\t0\t1\tno sentence\n",
            r"LSMDC16_annos_val\.csv:2: expected 6 tab-separated",
        ),
        (
            "vatex",
            "vatex_validation_v1.0.json",
            '[{"videoID": "a_1_2", "enCap": "one string"}]',
            r"expected a list of caption strings",
        ),
        (
            "vatex",
            "vatex_validation_v1.0.json",
            '[{"videoID": "-_1YqDLz5sk_000010_000020", "enCap": ["x"]}]',
            r"'-_1YqDLz5sk_000010_000020' is listed in both vatex_training_v1\.0\.json and vatex_validation",
        ),
        (
            "folder",
            "captions.csv",
            "video_id,caption,split\na.mp4,x,dev\n",
            r"video 'a\.mp4' has split 'dev'",
        ),
        (
            "folder",
            "captions.csv",
            "video_id,caption,split\na.mp4,x,train\na.mp4,y,test\n",
            r"'a\.mp4' is in both train and test",
        ),
        (
            "folder",
            "captions.csv",
            "video_id,caption,split\na.mp4,  ,train\n",
            r"captions\.csv: video 'a\.mp4' has only empty captions",
        ),
    ],
)
def test_bad_annotations_name_the_file_and_problem(tmp_path, name, file, content, message):
    annotations = _annotations(tmp_path, name)
    (annotations / file).write_text(content, encoding="utf-8")
    with pytest.raises(BenchmarkError, match=message):
        _import(tmp_path, name, annotations)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("msrvtt", {"train_split": "8k"}, r"msrvtt: option train_split='8k' is not one of 9k, 7k"),
        ("msrvtt", {"bogus": "1"}, r"msrvtt: unknown option\(s\) bogus \(valid: train_split\)"),
        ("msvd", {"train_split": "7k"}, r"msvd: unknown option\(s\) train_split \(valid: none\)"),
        ("lsmdc", {"test_split": "2k"}, r"test_split='2k' is not one of 1k, full"),
        ("folder", {"split": "dev"}, r"split='dev' is not one of train, val, test"),
        ("youcook", {}, r"unknown benchmark 'youcook'; choose one of msrvtt, msvd"),
    ],
)
def test_bad_options_are_named(tmp_path, name, options, message):
    annotations = FIXTURES / name if name in IMPORTERS else tmp_path
    with pytest.raises(BenchmarkError, match=message):
        import_benchmark(name, annotations, _videos(tmp_path, "msrvtt"), tmp_path / "m.jsonl", options)


def test_cli_writes_manifest_and_prints_summary(tmp_path):
    videos = _videos(tmp_path, "msrvtt", skip=("video9258.webm",))
    out = tmp_path / "out" / "msrvtt-7k.jsonl"
    command = [
        sys.executable,
        str(REPO / "pipelines" / "manifest.py"),
        "msrvtt",
        "--annotations",
        str(FIXTURES / "msrvtt"),
        "--videos",
        str(videos),
        "--out",
        str(out),
        "--option",
        "train_split=7k",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["train", "2", "videos", "5", "captions"]
    assert "missing on disk: 1 (video9258)" in result.stdout
    entries = read_manifest(out)
    assert [e.video_id for e in entries] == ["video0", "video2", "video7579", "video7725", "video9258"]
    assert entries[0].path == "../videos/video0.mp4"


def test_cli_errors_name_the_problem(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("manifest_cli", REPO / "pipelines" / "manifest.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main
    videos = _videos(tmp_path, "msrvtt")
    base = ["msrvtt", "--annotations", str(tmp_path), "--videos", str(videos), "--out"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, str(tmp_path / "m.jsonl")])
    assert exit_info.value.code == 2  # bad input
    assert "error: annotation file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "m.jsonl", "--option", "7k"])
    assert exit_info.value.code == 2
    assert "option '7k' is not of the form key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in IMPORTERS) and "train_split=9k" in help_text


def test_finder_prefers_the_usual_path_then_mp4_among_copies(tmp_path):
    for relative in ("a.webm", "a.mp4", "sub/a.avi", "sub/b.mkv", "c.mov.mp4"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).touch()
    finder = VideoFinder(tmp_path)
    assert finder.find("sub/a.avi", ("a",)) == tmp_path / "sub" / "a.avi"
    assert finder.find("a.mkv", ("a",)) == tmp_path / "a.mp4"
    assert finder.find("b.mp4", ("b",)) == tmp_path / "sub" / "b.mkv"
    assert finder.find("c.mov", ("c.mov", "c")) == tmp_path / "c.mov.mp4"
    assert finder.find("d.mp4", ("d",)) is None
