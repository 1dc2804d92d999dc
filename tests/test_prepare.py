"""Prepare on real Ray (local, 2 CPUs) and read back: frames, schema, counts, quarantine, re-runs, readers."""

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import cloudpickle
import decord
import faulty_decoders
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import marked_frames, read_frame_number, write_broken_videos, write_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from hvd.config import Config, SyntheticConfig, load_config
from hvd.data.decode import DecodedClip, FrameSpec, decode_clip
from hvd.data.manifest import ManifestEntry, read_manifest, resolve_video_path, write_manifest
from hvd.data.prepare import (
    QUARANTINE_FILE,
    SHARD_FORMAT,
    SHARD_SCHEMA,
    SUMMARY_FILE,
    PrepareError,
    ground_truth,
    prepare,
)
from hvd.data.shards import ShardError, ShardSummary, frame_mask, frames_uint8, read_shards
from hvd.data.synthetic import generate
from hvd.eval.actors import VideoEncoder
from hvd.model import build_model, build_tokenizer
from hvd.train.inputs import caption_choice, caption_passes, epoch_batches, training_dataset
from hvd.train.rows import augment_clip

_CLI = importlib.util.spec_from_file_location("prepare_cli", Path(__file__).parents[1] / "pipelines" / "prepare.py")
prepare_cli = importlib.util.module_from_spec(_CLI)
_CLI.loader.exec_module(prepare_cli)

pytestmark = pytest.mark.slow

SPLITS = ("train", "val", "test")


def config(*overrides: str) -> Config:
    return load_config(None, list(overrides))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cfg = SyntheticConfig(preset="tiny", out=str(tmp_path_factory.mktemp("synth")), workers=1)
    return generate(cfg, progress=False)


@pytest.fixture(scope="module")
def raw_shards(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "shards"
    prepare(config("data.frame_codec=raw"), tiny, out)
    return out


@pytest.fixture(scope="module")
def jpeg_shards(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jpeg") / "shards"
    prepare(config(), tiny, out)
    return out


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """A manifest of two sound clips, a short one, a rotated phone clip and every kind of broken file."""
    folder = tmp_path_factory.mktemp("messy")
    upright = marked_frames(20, 64, 96)
    videos = {
        "good_a": write_clip(folder / "good_a.mp4", marked_frames(20, 64, 64)),
        "good_b": write_clip(folder / "good_b.mp4", marked_frames(30, 72, 64)),
        "short": write_clip(folder / "short.mp4", marked_frames(5, 64, 64)),
        "rotated": write_clip(folder / "rotated.mp4", np.ascontiguousarray(np.rot90(upright, -1, (1, 2))), rotation=90),
    }
    videos.update(write_broken_videos(folder / "broken"))
    entries = [
        ManifestEntry(name, str(path.relative_to(folder)), [f"caption of {name}"], "test" if name == "good_b" else "train")
        for name, path in videos.items()
    ]
    return write_manifest(entries, folder / "manifest.jsonl")


def test_shards_hold_exactly_the_frames_decord_gives(tiny, raw_shards):
    manifest = {e.video_id: e for e in read_manifest(tiny)}
    seen = []
    for split in SPLITS:
        table = read_shards(raw_shards, split)
        assert table.schema.remove_metadata() == SHARD_SCHEMA
        assert table["video_id"].to_pylist() == sorted(table["video_id"].to_pylist())
        for row in table.to_pylist():
            entry = manifest[row["video_id"]]
            assert (row["split"], row["captions"]) == (split, entry.captions)
            reader = decord.VideoReader(str(resolve_video_path(entry, tiny)), num_threads=1)
            expected = reader.get_batch(row["frame_indices"]).asnumpy()  # tiny clips are 64 px: no resize
            np.testing.assert_array_equal(frames_uint8(row), expected)
            assert row["num_frames"] == row["valid_frames"] == len(row["frames"]) == 12
            assert row["source_frames"] == 20 and row["source_fps"] == pytest.approx(10)
            assert row["duration_s"] == pytest.approx(2.0, abs=1e-6)
            seen.append(row["video_id"])
    assert sorted(seen) == sorted(manifest)


def test_pyav_shards_hold_the_same_rows_and_the_decoder_reaches_the_decode_children(tiny, raw_shards, tmp_path):
    """`data.decoder=pyav` on the tiny benchmark: the same rows as decord's. A variable-rate clip, whose MP4
    packet durations the two decoders' FFmpeg builds read differently, shows the children used PyAV."""
    out = tmp_path / "pyav"
    prepare(config("data.frame_codec=raw", "data.decoder=pyav"), tiny, out)
    for split in SPLITS:
        assert read_shards(out, split).to_pylist() == read_shards(raw_shards, split).to_pylist()
    path = write_clip(tmp_path / "vfr.mp4", marked_frames(40, 64, 64), pts_ms=np.cumsum([0, *[33, 100, 20] * 13]).tolist())
    manifest = write_manifest([ManifestEntry("vfr", str(path), ["a caption"], "train")], tmp_path / "vfr.jsonl")
    durations = {}
    for decoder in ("decord", "pyav"):
        prepare(config(f"data.decoder={decoder}"), manifest, tmp_path / decoder / "vfr")
        durations[decoder] = read_shards(tmp_path / decoder / "vfr", "train")["duration_s"].to_pylist()
    assert durations == {decoder: [decode_clip(path, FrameSpec(), decoder=decoder).duration_s] for decoder in durations}
    assert durations["pyav"] != durations["decord"]


def test_shard_rows_carry_the_ground_truth_of_each_sampled_frame(tiny, raw_shards):
    """Which sampled frames show the event and the target's box in each, from the manifest's `event`; null for
    a manifest that records none (the messy one's rows: checked in `test_broken_files_...`)."""
    manifest = {e.video_id: e for e in read_manifest(tiny)}
    for split in SPLITS:
        for row in read_shards(raw_shards, split).to_pylist():
            event = manifest[row["video_id"]].extra["event"]
            start, end = event["start_frame"], event["end_frame"]
            assert row["event_frames"] == [start <= i < end for i in row["frame_indices"]]
            assert row["target_boxes"] == [
                pytest.approx(event["boxes"][i - start]) if start <= i < end else [] for i in row["frame_indices"]
            ]


def test_ground_truth_by_time_when_the_event_names_no_frames():
    clip = DecodedClip([b""] * 3, 3, [0, 5, 10], [0.0, 0.5, 1.0], 11, 10.0, 1.1, False)
    assert ground_truth({"start_s": 0.5, "end_s": 1.0}, clip) == {"event_frames": [False, True, False],
                                                                  "target_boxes": None}
    assert ground_truth(None, clip) == {"event_frames": None, "target_boxes": None}


def test_summary_and_metadata_record_counts_and_settings(tiny, raw_shards):
    summary = ShardSummary.read(raw_shards)
    assert (summary.input, summary.written, summary.quarantined) == (40, 40, 0)
    assert summary.splits == {"train": 24, "val": 8, "test": 8}
    assert summary.frame_spec["frame_codec"] == "raw" and summary.frame_spec["num_frames"] == 12
    for shard in (raw_shards / "train").glob("*.parquet"):
        stored = json.loads(pq.read_schema(shard).metadata[b"hvd"])
        assert stored["frame_spec"] == summary.frame_spec
        assert stored["manifest_fingerprint"] == summary.manifest_fingerprint
    assert pq.read_table(raw_shards / QUARANTINE_FILE).num_rows == 0


def test_rerun_does_no_work_and_other_settings_refuse_to_mix(tiny, raw_shards):
    before = {p: p.stat().st_mtime_ns for p in raw_shards.rglob("*")}
    again = prepare(config("data.frame_codec=raw"), tiny, raw_shards)
    assert again.skipped and (again.input, again.written, again.quarantined) == (40, 40, 0)
    assert "nothing to do" in str(again)
    assert {p: p.stat().st_mtime_ns for p in raw_shards.rglob("*")} == before
    with pytest.raises(PrepareError, match="frame_spec.num_frames: 12 -> 8.*--overwrite"):
        prepare(config("data.frame_codec=raw", "data.num_frames=8"), tiny, raw_shards)


def test_shards_of_an_older_format_are_re_prepared_not_refused(tiny, raw_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(raw_shards, old)
    summary = json.loads((old / SUMMARY_FILE).read_text())
    (old / SUMMARY_FILE).write_text(json.dumps({**summary, "shard_format": 1}))
    redone = prepare(config("data.frame_codec=raw"), tiny, old)
    assert not redone.skipped and redone.written == 40
    assert json.loads((old / SUMMARY_FILE).read_text())["shard_format"] == SHARD_FORMAT


def test_two_prepares_into_one_folder_at_once_leave_one_complete_copy(tiny, tmp_path, capsys):
    # Two writers in two threads: each opens the lock file itself, so they contend exactly as two
    # processes (two evaluation jobs sharing eval.cache) do; a dead writer's staging folder is in the way.
    out = tmp_path / "shared"
    (tmp_path / ".shared.partial" / "train").mkdir(parents=True)
    (tmp_path / ".shared.partial" / "train" / "left-by-a-killed-run.parquet").write_bytes(b"junk")
    results = {}

    def run(name):
        results[name] = prepare(config(), tiny, out)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    while not (tmp_path / ".shared.lock").is_file() or not (tmp_path / ".shared.lock").read_text():
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(), second.join()

    assert not results["first"].skipped and results["second"].skipped
    assert "waiting for the prepare run that holds it (pid" in capsys.readouterr().out
    counts = ShardSummary.read(out).splits
    for split in SPLITS:
        ids = read_shards(out, split)["video_id"].to_pylist()
        assert len(ids) == len(set(ids)) == counts[split]
    assert sum(counts.values()) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]  # no staging left behind

    # A reader refuses a folder changed after the summary was written.
    copy = next((out / "train").glob("*.parquet"))
    shutil.copy(copy, copy.with_name("copy-" + copy.name))
    with pytest.raises(ShardError, match=r"train: \d+ rows on disk where _summary.json says \d+"):
        read_shards(out, "train")


def _rows_by_split(shards: Path) -> dict[str, list[dict]]:
    return {split: read_shards(shards, split).to_pylist() for split in SPLITS}


def test_a_killed_prepare_leaves_no_process_and_its_rerun_decodes_only_the_rest(tiny, tmp_path):
    command = [sys.executable, str(Path(__file__).parents[1] / "pipelines" / "prepare.py"), "--manifest", str(tiny),
               "--out", str(tmp_path / "killed"), "data.shard_videos=2"]  # 20 parts of 2 videos
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver, seen = psutil.Process(run.pid), {}
    parts = tmp_path / ".killed.partial" / "_parts"
    deadline = time.time() + 300
    while not list(parts.glob("*.done")):  # Ray is up and the first part is written
        assert run.poll() is None and time.time() < deadline
        seen |= {child.pid: child for child in driver.children(recursive=True)}
        time.sleep(0.02)
    seen |= {child.pid: child for child in driver.children(recursive=True)}
    killed_at = time.time()
    run.kill()
    run.wait()
    assert len(seen) >= 4  # Ray's GCS, raylet, agents and workers, decoder processes, and the watcher
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)  # without the watcher the agents outlive this
    assert not alive, [(" ".join(p.cmdline())[:200], p.ppid(), p.create_time() - killed_at) for p in alive]
    kept = {path: path.stat().st_mtime_ns for split in SPLITS
            for path in (tmp_path / ".killed.partial" / split).glob("part-*.parquet")}
    done = len(list(parts.glob("*.done")))
    assert kept and done < 20

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming an interrupted run, {done} of 20 parts already written" in rerun.stdout
    assert "input 40 = written 40 + quarantined 0" in rerun.stdout
    for path, mtime in kept.items():  # the parts written before the kill were kept, not decoded again
        published = tmp_path / "killed" / path.relative_to(tmp_path / ".killed.partial")
        assert published.stat().st_mtime_ns == mtime
    whole = prepare(config("data.shard_videos=2"), tiny, tmp_path / "whole")
    assert whole.written == 40
    assert _rows_by_split(tmp_path / "killed") == _rows_by_split(tmp_path / "whole")  # same rows, same bytes


def test_a_video_that_crashes_or_hangs_its_decoder_is_quarantined_and_its_batch_written(tiny, tmp_path):
    entries = read_manifest(tiny)[:6]
    for name in ("crash", "hang"):
        source = resolve_video_path(entries[0], tiny)
        shutil.copy(source, tmp_path / f"{name}.mp4")
        entries.insert(3, ManifestEntry(name, str(tmp_path / f"{name}.mp4"), ["a caption"], "train"))
    entries = [ManifestEntry(e.video_id, str(resolve_video_path(e, tiny)), e.captions, e.split) for e in entries]
    manifest = write_manifest(entries, tmp_path / "manifest.jsonl")
    for pickler in (cloudpickle, ray.cloudpickle):  # the function travels by value to Ray and on to the child
        pickler.register_pickle_by_value(faulty_decoders)
    summary = prepare(config("data.decode_timeout_s=3", "data.decode_concurrency=1"), manifest, tmp_path / "out",
                      decode=faulty_decoders.by_file_name)  # one part: the failures share it with six sound videos
    assert (summary.input, summary.written, summary.quarantined) == (8, 6, 2)
    quarantine = {row["video_id"]: row for row in pq.read_table(tmp_path / "out" / QUARANTINE_FILE).to_pylist()}
    assert {key: row["reason"] for key, row in quarantine.items()} == {"crash": "decoder_crash", "hang": "timeout"}
    assert "died (signal SIGSEGV)" in quarantine["crash"]["error"] and "crash.mp4" in quarantine["crash"]["error"]
    assert "data.decode_timeout_s=3" in quarantine["hang"]["error"]
    written = {row["video_id"] for split in SPLITS if summary.splits.get(split) for row in read_shards(tmp_path / "out", split).to_pylist()}
    assert written == {e.video_id for e in entries} - {"crash", "hang"}


def test_a_shard_folder_holding_other_files_is_not_replaced(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareError, match=r"mine holds files prepare did not write \(notes.txt\)"):
        prepare(config(), tiny, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_broken_files_are_quarantined_and_the_rest_written(messy, tmp_path):
    summary = prepare(config("data.frame_codec=raw"), messy, tmp_path / "out")
    assert (summary.input, summary.written, summary.quarantined, summary.short_clips) == (11, 4, 7, 1)
    quarantine = pq.read_table(tmp_path / "out" / QUARANTINE_FILE).to_pylist()
    reasons = {row["video_id"]: row["reason"] for row in quarantine}
    assert reasons == {
        "cut_mp4": "corrupt",
        "cut_mkv": "truncated",
        "directory": "not_a_file",
        "random": "corrupt",
        "empty": "empty",
        "audio_only": "no_video_stream",
        "missing": "missing",
    }
    entries = {e.video_id: e for e in read_manifest(messy)}
    for row in quarantine:
        assert row["path"] == str(resolve_video_path(entries[row["video_id"]], messy)) and row["path"] in row["error"]
    rows = {row["video_id"]: row for row in read_shards(tmp_path / "out", "train").to_pylist()}
    assert set(rows) == {"good_a", "short", "rotated"}
    assert all(row["event_frames"] is row["target_boxes"] is None for row in rows.values())  # no ground truth recorded
    assert rows["short"]["valid_frames"] < 12 == rows["good_a"]["valid_frames"]
    short = frames_uint8(rows["short"])
    valid = rows["short"]["valid_frames"]
    assert [read_frame_number(f) for f in short[:valid]] == rows["short"]["frame_indices"]
    assert not short[valid:].any()
    assert frame_mask([rows["short"], rows["good_a"]]).sum(axis=1).tolist() == [valid, 12]
    for frame in frames_uint8(rows["rotated"]):  # upright: the white marker is in the top-left quarter
        assert frame[:32, :32].mean() > frame[32:, 32:].mean() + 40 and frame[:32, :32].mean() > frame[:32, 32:].mean() + 40
    recorded = ShardSummary.read(tmp_path / "out")
    assert recorded.input == recorded.written + recorded.quarantined == 11


def test_same_input_same_rows_and_overwrite_replaces(messy, tmp_path):
    first = prepare(config(), messy, tmp_path / "a")
    prepare(config(), messy, tmp_path / "b")
    for split in ("train", "test"):
        assert read_shards(tmp_path / "a", split).equals(read_shards(tmp_path / "b", split))
    replaced = prepare(config("data.num_frames=4"), messy, tmp_path / "a", overwrite=True)
    assert not replaced.skipped and replaced.written == first.written
    assert {len(r["frames"]) for r in read_shards(tmp_path / "a", "train").to_pylist()} == {4}


def test_cli_prints_the_identity_and_fails_only_when_nothing_is_written(messy, tmp_path, capsys):
    prepare_cli.main(["--manifest", str(messy), "--out", str(tmp_path / "cli"), "data.num_frames=4"])
    printed = capsys.readouterr().out
    assert "input 11 = written 4 + quarantined 7" in printed and QUARANTINE_FILE in printed
    prepare_cli.main(["--manifest", str(messy), "--out", str(tmp_path / "cli"), "data.num_frames=4"])
    assert "nothing to do" in capsys.readouterr().out

    broken = [e for e in read_manifest(messy) if e.video_id in ("empty", "missing")]
    only_broken = write_manifest(broken, messy.parent / "only_broken.jsonl")
    with pytest.raises(SystemExit) as caught:
        prepare_cli.main(["--manifest", str(only_broken), "--out", str(tmp_path / "none")])
    assert caught.value.code == 1
    assert "input 2 = written 0 + quarantined 2" in capsys.readouterr().out
    assert (tmp_path / "none" / SUMMARY_FILE).is_file()


def test_training_inputs_decode_in_ray_data_and_normalise_on_the_model(raw_shards, jpeg_shards):
    cfg = config(f"data.shards={jpeg_shards}", "train.batch_size=8", "model.pretrained=null")
    raw = {r["video_id"]: r for r in read_shards(raw_shards, "train").to_pylist()}
    jpeg = {r["video_id"]: r for r in read_shards(jpeg_shards, "train").to_pylist()}
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)

    seen = {}
    for epoch in (0, 1):
        iterator = training_dataset(cfg, jpeg_shards).iterator()
        for batch in epoch_batches(iterator, 8, tokenizer, seed=0, epoch=epoch, pin_memory=False):
            assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (8, 12, 64, 64, 3)
            # captions trimmed to the batch's longest: its last column holds a real token
            assert batch["tokens"].dtype == torch.long and batch["tokens"].shape[0] == 8
            assert batch["tokens"].shape[1] < 32 and (batch["tokens"][:, -1] != 0).any()
            for frames, tokens in zip(batch["frames"], batch["tokens"], strict=True):
                # which video: the decoded frames of exactly one row match, bit for bit
                (video_id,) = [v for v, row in jpeg.items() if np.array_equal(frames.numpy(), frames_uint8(row))]
                assert np.abs(frames.numpy().astype(int) - frames_uint8(raw[video_id])).mean() < 6  # JPEG q90
                captions = jpeg[video_id]["captions"]
                expected = captions[caption_choice(0, epoch, video_id, len(captions))]
                full = tokenizer([expected])[0]
                torch.testing.assert_close(tokens, full[: len(tokens)])
                assert not full[len(tokens) :].any()  # only padding was cut
                seen.setdefault(video_id, set()).add(expected)
    assert seen.keys() == raw.keys()  # 24 train videos, 3 batches of 8, nothing dropped
    assert any(len(drawn) == 2 for drawn in seen.values())  # a fresh caption draw in the next epoch

    model = build_model(cfg.model)
    frames = torch.from_numpy(np.stack([frames_uint8(raw[v]) for v in sorted(raw)[:2]]))
    pixels = frames.permute(0, 1, 4, 2, 3).float() / 255
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    torch.testing.assert_close(model.normalize_frames(frames), (pixels - mean) / std)
    with pytest.raises(ValueError, match="uint8"):
        model.normalize_frames(pixels)


def test_expand_captions_trains_every_caption_once_an_epoch_and_never_one_video_twice_in_a_batch(jpeg_shards):
    cfg = config("data.expand_captions=true")
    jpeg = {r["video_id"]: r for r in read_shards(jpeg_shards, "train").to_pylist()}
    passes = caption_passes(cfg, jpeg_shards)
    assert passes == 5 and caption_passes(config(), jpeg_shards) == 1  # the tiny benchmark: 5 captions a video
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
    by_tokens = {(v, tuple(tokenizer([c])[0].tolist())): c for v, row in jpeg.items() for c in row["captions"]}
    trained, orders = [], []
    iterator = training_dataset(cfg, jpeg_shards).iterator()
    shown = 2  # of the epoch's 5 passes (each a Ray Data execution); that `passes` passes cover every caption:
    # caption_choice is a permutation per (epoch, video), checked below
    for batch in epoch_batches(iterator, 8, tokenizer, seed=0, epoch=0, pin_memory=False, passes=shown,
                               steps_per_pass=3):
        videos = [next(v for v, row in jpeg.items() if np.array_equal(f.numpy(), frames_uint8(row)))
                  for f in batch["frames"]]
        assert len(set(videos)) == len(videos)  # no video twice in a batch: no false negative of itself
        for video_id, tokens in zip(videos, batch["tokens"], strict=True):  # tokens cut to the batch's longest
            caption = next(c for (v, t), c in by_tokens.items()
                           if v == video_id and t[: len(tokens)] == tuple(tokens.tolist()) and not any(t[len(tokens):]))
            trained.append((video_id, caption))
        orders.append(videos)
    # every video once a pass, each with the caption its pass draws, the passes in different orders
    assert sorted(trained) == sorted(
        (v, row["captions"][caption_choice(0, 0, v, len(row["captions"]), p)]) for p in range(shown) for v, row in jpeg.items()
    )
    assert all(len({c for v2, c in trained if v2 == v}) == shown for v in jpeg)  # another caption each pass
    assert sum(orders[:3], []) != sum(orders[3:], [])
    for video_id, row in jpeg.items():  # `passes` passes draw every caption once
        count = len(row["captions"])
        assert sorted(caption_choice(0, 0, video_id, count, p) for p in range(passes)) == list(range(count))
    assert [caption_choice(0, 0, "v", 5, p) for p in range(5)] != [caption_choice(0, 1, "v", 5, p) for p in range(5)]


def test_ray_trains_import_of_the_plan_and_the_training_function_holds_no_torch(jpeg_shards):
    """Ray Train's controller, its dataset manager and the split coordinator each unpickle the training function
    or the dataset's plan, one process after another before the first step: what they import costs every run.
    A fresh process loading both, as they do, imports neither torch, open_clip nor MLflow."""
    from hvd.train.entry import train_loop_per_worker

    cfg = config(f"data.shards={jpeg_shards}", "data.augment=crop_flip")
    pickled = cloudpickle.dumps((train_loop_per_worker, training_dataset(cfg, jpeg_shards)))
    probe = ("import pickle, sys\n"
             "train_fn, dataset = pickle.loads(sys.stdin.buffer.read())\n"
             "assert callable(train_fn) and dataset is not None\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'mlflow', 'torchvision'}))\n")
    done = subprocess.run([sys.executable, "-c", probe], input=pickled, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip().splitlines()[-1] == "[]", done.stdout.decode()[-500:]


def test_augmentation_draws_once_per_clip_in_training_and_evaluation_never_augments(jpeg_shards):
    torch.manual_seed(0)
    rows = read_shards(jpeg_shards, "train").to_pylist()
    still = np.stack([frames_uint8(rows[0])[0]] * 4)  # one frame four times
    for kind in ("crop_flip", "randaugment"):
        outs = [augment_clip(still, kind) for _ in range(5)]
        assert all(out.shape == still.shape and out.dtype == np.uint8 for out in outs)
        assert all(np.array_equal(out[0], frame) for out in outs for frame in out)  # one draw: the frames alike
        assert any(not np.array_equal(out, still) for out in outs)
    assert augment_clip(still, "none") is still

    cfg = config(f"data.shards={jpeg_shards}", "train.batch_size=8", "model.pretrained=null", "data.augment=crop_flip")
    stored = [frames_uint8(row) for row in rows]
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_words)
    trained = [clip.numpy() for batch in epoch_batches(training_dataset(cfg, jpeg_shards).iterator(), 8, tokenizer, 0, 0,
                                                       False) for clip in batch["frames"]]
    assert len(trained) == len(stored) and any(not any(np.array_equal(t, s) for s in stored) for t in trained)

    # evaluation's encoder (the actor class evaluate.py and index.py run) reads the same config: frames untouched
    weights = [ray.put(build_model(cfg.model).state_dict())]
    test = read_shards(jpeg_shards, "test")
    plain = VideoEncoder(replace(cfg, data=replace(cfg.data, augment="none")), weights)(test)
    augmented = VideoEncoder(cfg, weights)(test)
    assert all(np.array_equal(augmented[name], plain[name]) for name in ("frames", "patches"))
