"""The batch evaluation job: model sources, pictures, and end to end with Ray Data actors and MLflow."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_broken_videos
from mlflow.tracking import MlflowClient
from PIL import Image

from hvd.checkpoint import save_state
from hvd.config import ModelConfig, load_config, to_yaml
from hvd.data.manifest import ManifestEntry, read_manifest, write_manifest
from hvd.data.shards import ShardSummary, read_shards
from hvd.eval import plots
from hvd.eval.actors import encode_with_actors
from hvd.eval.encode import encode_split
from hvd.eval.explain import PairExplanation
from hvd.eval.job import job_config, prepared_shards, stage1_line
from hvd.eval.metrics import CONVENTIONS as METRIC_CONVENTIONS
from hvd.gallery import GalleryIndex
from hvd.model import build_model, build_tokenizer
from hvd.model.clustering import dpc_knn
from hvd.model.ffsm import select_frames
from hvd.model.heads import HCMIHead, HVDHead, XPoolHead
from hvd.model.pfcm import PFCM
from hvd.registry.models import version_model_id
from hvd.registry.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, tracking_uri
from hvd.registry.sources import ModelSourceError, load_model_source


def load_pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", Path(__file__).parents[1] / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_pipeline, index_pipeline, search_pipeline = (load_pipeline(n) for n in ("evaluate", "index", "search"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig()).eval()


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        return image.size


# --- the model's explanation of a pair --------------------------------------------------------------


def test_pfcm_entity_assignment_follows_the_clusters_through_every_round():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 32)
    one_round = PFCM(32, steps=1, ratio=0.5, k=3)
    convolved = one_round.rounds[0].norm_tokens(tokens)  # the token convolution starts as the identity
    assert torch.equal(one_round(tokens)[2], dpc_knn(convolved, 0.5, 3).assignment)
    three_rounds = PFCM(32, steps=3, ratio=0.5, k=3)
    merged, _, entities = three_rounds(tokens)
    assert entities.shape == (3, 16) and int(entities.min()) >= 0
    assert int(entities.max()) < merged.shape[1] == 2  # 16 -> 8 -> 4 -> 2 entities
    mask = torch.arange(16) < torch.tensor([[16], [9], [16]])
    assert (three_rounds(tokens, mask)[2] == -1).sum(dim=1).tolist() == [0, 7, 0]
    assert torch.equal(PFCM(32, steps=0, ratio=0.5, k=3)(tokens)[2], torch.arange(16).expand(3, 16))


def test_head_explains_which_frames_ffsm_kept(tiny_model):
    frames = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pooled, patches, _ = tiny_model.backbone.encode_images(frames, with_patches=True)
    unit_frames = F.normalize(pooled, dim=-1)
    sentence = tiny_model.encode_text(build_tokenizer(ModelConfig(), 32)(["a red circle rises"])).sentence[0]
    mask = torch.arange(12) < 10  # two padding frames
    parts = tiny_model.head.explain(sentence, unit_frames, patches, mask)
    assert parts["kept"].sum() == 5 and not parts["kept"][10:].any()  # frame_keep 0.5 of 10 real frames
    assert torch.equal(parts["kept"], select_frames(sentence[None], unit_frames[None], 0.5, mask[None])[0, 0])
    real = parts["frame_scores"][:10]
    kept_scores, dropped_scores = real[parts["kept"][:10]], real[~parts["kept"][:10]]
    assert kept_scores.min() >= dropped_scores.max()
    entities = parts["entities"]
    # video scope (the default): 160 real patches -> 80 -> 40 -> 20 entities numbered across the video
    assert entities.shape == (12, 16) and int(entities.max()) < 20 and (entities[10:] == -1).all()
    assert (entities[:10] >= 0).all() and len(entities[:10].unique()) == 20


# --- pictures ---------------------------------------------------------------------------------------


def test_pictures_are_written_and_readable(tmp_path):
    ranks = {
        "exhaustive": {"t2v": torch.tensor([1, 3, 2, 9]), "v2t": torch.tensor([1, 1, 4, 2])},
        "two_stage": {"t2v": torch.tensor([1, 3, 2, 9]), "v2t": torch.tensor([1, 1, 4, 2])},  # on top of it
    }
    figure = plots.recall_figure(ranks, {"t2v": 10, "v2t": 120})
    for axis in figure.axes:
        figure.canvas.draw()
        labels = [tick.get_text() for tick in axis.get_xticklabels() if tick.get_text()]
        assert labels and all(label.isdigit() for label in labels), labels  # "1 2 5 10", never "2x10^0"
        styles = {(line.get_linestyle(), line.get_linewidth()) for line in axis.get_lines()}
        assert len(styles) == 2  # the two-stage line stays visible where it lies on the exhaustive one
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["exhaustive", "two-stage"]
    assert png_size(plots.recall_curves(ranks, {"t2v": 10, "v2t": 12}, tmp_path / "r.png")) == (1000, 400)

    scores = torch.randn(40, 36)
    shown = scores > 0
    path = plots.similarity_slice(scores, torch.arange(40) % 36, "scores", tmp_path / "s.png", shown=shown)
    assert png_size(path) == (600, 500)

    rng = np.random.default_rng(0)
    entities = rng.integers(0, 7, (12, 4, 4))
    entities[11] = -1  # a padding frame
    pair = PairExplanation(
        caption="a red circle rises " * 12,  # a long caption wraps instead of shrinking the figure
        video_id="v0",
        rank=3,
        frames=rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8),
        valid=np.arange(12) < 11,
        frame_scores=rng.normal(size=12).astype(np.float32),
        kept=np.arange(12) % 2 == 0,
        entities=entities,
        legend=HVDHead.explain_legend,
    )
    figure = plots.frame_selection_figure(pair)
    titles = [axis.get_title() for axis in figure.axes]
    kept_titles = [t for t in titles if t.endswith("entities")]
    assert len(kept_titles) == 6 and all(int(t.split()[0]) <= 7 for t in kept_titles)
    assert "padding" in titles and "PFCM entity (7 colours)" in figure.get_suptitle()
    assert max(len(line) for line in figure.get_suptitle().splitlines()) <= 110
    width, height = png_size(plots.frame_selection(pair, tmp_path / "f.png"))
    assert width < 1000 and height > 600  # 12 frames wrap into two rows of 6
    with Image.open(tmp_path / "f.png") as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels - [0x1A, 0x98, 0x50]).sum(axis=1) < 30).sum() > 500  # green frames round kept frames

    # a head without entities (X-Pool, EERCF): one row of frames per row, its own legend
    attention = dataclasses.replace(pair, entities=None, legend=XPoolHead.explain_legend)
    figure = plots.frame_selection_figure(attention)
    assert len(figure.axes) == 12 and "X-Pool attention" in figure.get_suptitle()
    assert "colours" not in figure.get_suptitle()
    assert png_size(plots.frame_selection(attention, tmp_path / "a.png"))[1] < height

    # a head that clusters frames into clips (HCMI): every real frame names its clip
    clustered = dataclasses.replace(attention, groups=np.where(np.arange(12) < 11, np.arange(12) // 4, -1),
                                    legend=HCMIHead.explain_legend)
    titles = [axis.get_title() for axis in plots.frame_selection_figure(clustered).axes]
    assert titles[0].startswith("frame 0 (clip 0)") and titles[10].startswith("frame 10 (clip 2)")
    assert titles[11] == "padding"


# --- model sources and config -----------------------------------------------------------------------


def test_bad_model_uris_are_errors_naming_them(tmp_path):
    with pytest.raises(ModelSourceError, match="nowhere/at/all"):
        load_model_source("nowhere/at/all")
    with pytest.raises(ModelSourceError, match="state.pt"):
        load_model_source(str(tmp_path))


def test_checkpoint_directory_loads_with_its_config(tmp_path, tiny_model):
    cfg = load_config(None, ["data.num_frames=8", "model.hvd.frame_keep=0.25", "model.pretrained=null"])
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(
        tmp_path, model, optimizer, scheduler, step=3, epoch=1, best_score=0.0, config_yaml=to_yaml(cfg)
    )
    loaded, loaded_cfg, source = load_model_source(str(tmp_path))
    assert loaded_cfg == cfg and not loaded.training
    assert (source.name, source.version, source.source_run) == (tmp_path.name, "checkpoint", "")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_job_takes_frame_sampling_from_the_model_and_the_rest_from_the_command_line():
    trained = load_config(None, ["data.num_frames=8", "data.max_words=20", "model.head=meanp"])
    cli = load_config(None, ["data.num_frames=30", "data.decode_concurrency=1", "eval.topk=5"])
    cfg = job_config(cli, trained)
    assert (cfg.data.num_frames, cfg.data.max_words, cfg.model.head) == (8, 20, "meanp")
    assert (cfg.data.decode_concurrency, cfg.eval.topk) == (1, 5)


def test_help_documents_the_flags_and_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_pipeline.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "--model",
        "--manifest",
        "--shards",
        "models:/NAME@ALIAS",
        "eval.topk",
        "eval.mode",
        "eval.benchmark",
        "eval.num_actors",
        "pessimistic",
        "two_stage",
    ):
        assert needle in text, needle


# --- end to end: Ray Data actors, MLflow registry and eval runs -------------------------------------


def run_pipeline(registered, capsys, *args: str, pipeline=evaluate_pipeline) -> str:
    cfg = registered["cfg"]
    pipeline.main(
        [
            *args,
            f"tracking.uri={cfg.tracking.uri}",
            f"eval.out={cfg.eval.out}",
            f"eval.cache={cfg.eval.cache}",
        ]
    )
    return capsys.readouterr().out


@pytest.mark.slow
def test_registered_model_by_alias_end_to_end(registered, capsys):
    out = run_pipeline(
        registered,
        capsys,
        "--model",
        "models:/hvd@champion",
        "--manifest",
        str(registered["manifest"]),
        "eval.mode=two_stage",
        "eval.topk=8",
        "eval.compare=true",
        "eval.dsl=true",
    )
    assert "exhaustive/t2v" in out and "speed-up" in out
    client = MlflowClient(tracking_uri(registered["cfg"]))
    experiment = client.get_experiment_by_name("eval/bench")  # the manifest's folder name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id in out
    tags = run.data.tags
    assert (tags["model_name"], tags["model_version"], tags["source_run"]) == (
        "hvd",
        "1",
        registered["run_id"],
    )
    assert tags["mode"] == "two_stage" and tags["split"] == "test"
    assert tags["mlflow.user"] and "hvd version 1 (hvd head) on the test split of bench" in tags["mlflow.note.content"]
    params = run.data.params  # what the command was given, not the defaults it replaced
    assert params["eval.model"] == "models:/hvd@champion" and params["data.manifest"] == str(registered["manifest"])
    assert run.info.run_id in out and f"/runs/{run.info.run_id}" in out
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "bench" and dataset.tags[0].value == "test"
    # the same names as the training run's test metrics, and on the evaluated model's page too
    metrics = {key.removeprefix("test/"): value for key, value in run.data.metrics.items()}
    assert "test/t2v/R1" in run.data.metrics and "test/exhaustive/t2v/R1" in run.data.metrics
    version = client.get_model_version("hvd", "1")
    model_metrics = {m.key: m.value for m in client.get_logged_model(version_model_id(version)).metrics}
    assert model_metrics["test/t2v/R1"] == run.data.metrics["test/t2v/R1"]
    assert metrics["videos"] == 8 and metrics["captions"] == 8 and metrics["excluded_videos"] == 0
    for key in (
        "time/stage1_s",
        "time/stage2_s",
        "time/exhaustive_s",
        "time/encode_s",
        "exhaustive/t2v/dsl_R1",
    ):
        assert key in metrics, key
    # top-8 of an 8-video gallery rescored everything: two-stage ranks exactly as exhaustive does
    for key in ("t2v/R1", "t2v/R5", "t2v/MdR", "t2v/MnR", "v2t/R1", "v2t/MnR"):
        assert metrics[key] == metrics[f"exhaustive/{key}"], key
    assert "t2v/dsl_R1" not in metrics  # DSL only where every pair was scored
    # the benchmark records its ground truth: the head's frame choice and entities scored against it, every video
    assert metrics["mechanism/pairs"] == 8 and 0 < metrics["mechanism/event_share"] < 1
    assert {"frame_precision", "event_mass", "entity_purity", "entity_split"} <= {
        key.removeprefix("mechanism/") for key in metrics}
    assert "looked at  event frames: " in out and "target entity: purity" in out

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "recall_at_k.png", "similarity_slice.png", "mechanism.png"} <= artifacts
    frame_pictures = sorted(a for a in artifacts if a.startswith("frames_query"))
    assert len(frame_pictures) == 3
    out_dir = Path(registered["cfg"].eval.out) / "bench" / "hvd-v1-two_stage"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["metrics"] == pytest.approx(metrics) and report["excluded"] == []
    assert report["metric_conventions"] == run.data.tags["metric_conventions"] == METRIC_CONVENTIONS
    assert png_size(out_dir / "recall_at_k.png") == (1000, 400)
    assert png_size(out_dir / frame_pictures[0])[0] < 1000

    # only the scored split was decoded, and it is cached: asking again decodes nothing
    cached = prepared_shards(
        job_config(registered["cfg"], registered["cfg"]), registered["manifest"], "bench"
    )
    assert cached.parent == Path(registered["cfg"].eval.cache) and (cached / "_summary.json").is_file()
    assert ShardSummary.read(cached).splits == {"test": 8} and not (cached / "train").exists()


@pytest.mark.slow
def test_actor_pool_encodes_like_the_single_process_path(registered):
    cfg = registered["cfg"]
    model, trained, source = load_model_source(f"models:/hvd/{registered['version']}")
    assert source.source_run == registered["run_id"]
    shards = prepared_shards(job_config(cfg, trained), registered["manifest"], "bench")
    batched = encode_with_actors(model, job_config(cfg, trained), str(shards), "test")
    reference = encode_split(
        model, read_shards(shards, "test"), build_tokenizer(trained.model, trained.data.max_words)
    )
    assert batched.video_ids == reference.video_ids and batched.captions == reference.captions
    assert torch.equal(batched.text_video, reference.text_video)
    for ours, theirs in [(batched.video, reference.video), (batched.text, reference.text)]:
        for field in dataclasses.fields(ours):
            torch.testing.assert_close(getattr(ours, field.name), getattr(theirs, field.name), rtol=0, atol=1e-6)
    assert torch.equal(batched.text.word_mask, reference.text.word_mask)


@pytest.mark.slow
def test_broken_videos_are_excluded_and_reported(registered, capsys, tmp_path):
    bench = tmp_path / "partly_broken"
    entries = [e for e in read_manifest(registered["manifest"]) if e.split == "test"][:4]
    videos = bench / "videos"
    videos.mkdir(parents=True)
    for entry in entries:
        shutil.copy(registered["manifest"].parent / entry.path, videos / Path(entry.path).name)
        entry.path = f"videos/{Path(entry.path).name}"
    broken = write_broken_videos(bench / "broken")
    for kind in ("cut_mkv", "missing"):
        entries.append(
            ManifestEntry(f"bad_{kind}", str(broken[kind].relative_to(bench)), ["a broken clip"], "test")
        )
    manifest = write_manifest(entries, bench / "manifest.jsonl")

    out = run_pipeline(registered, capsys, "--model", "models:/hvd@latest", "--manifest", str(manifest))
    assert "2 videos excluded" in out and "bad_missing: missing" in out
    report = json.loads(
        (Path(registered["cfg"].eval.out) / "partly_broken" / "hvd-v1-exhaustive" / "report.json").read_text()
    )
    assert sorted(e["video_id"] for e in report["excluded"]) == ["bad_cut_mkv", "bad_missing"]
    assert report["metrics"]["videos"] == 4 and report["metrics"]["excluded_videos"] == 2


@pytest.mark.slow
def test_index_is_logged_tagged_reused_by_evaluation_and_searched(registered, capsys, tmp_path):
    version = f"models:/hvd/{registered['version']}"
    with pytest.raises(SystemExit):  # nothing indexed yet: the error says how to build an index
        run_pipeline(registered, capsys, "--model", version, "a red circle", pipeline=search_pipeline)
    assert "no gallery index yet; build one with python pipelines/index.py" in capsys.readouterr().err

    out = run_pipeline(registered, capsys, "--model", version, "--manifest", str(registered["manifest"]),
                       f"index.cache={tmp_path}/indexes", pipeline=index_pipeline)
    assert "indexed    8 videos of the test split of bench (flat, exact" in out
    client = MlflowClient(tracking_uri(registered["cfg"]))
    location = client.get_model_version("hvd", registered["version"]).tags["index.bench.test"]
    run_id = location.removeprefix("runs:/").removesuffix("/index")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "index" and run.data.metrics["videos"] == 8
    logged = {a.path for a in client.list_artifacts(run_id, "index")}
    assert logged == {f"index/{name}" for name in
                      ("index.json", "video_ids.parquet", "features.safetensors", "stage1.faiss")}

    # evaluation takes the videos from the index (downloaded into an empty cache) and ranks as without it
    runs = {}
    for use in ("true", "false"):
        out = run_pipeline(registered, capsys, "--model", version, "--manifest", str(registered["manifest"]),
                           "eval.mode=two_stage", "eval.topk=3", f"index.use={use}",
                           f"index.cache={tmp_path}/downloaded")
        assert (f"stage 1 from index {run_id}" in out) == (use == "true")
        report = Path(registered["cfg"].eval.out) / "bench" / "hvd-v1-two_stage" / "report.json"
        runs[use] = json.loads(report.read_text())
    assert (tmp_path / "downloaded" / run_id / "stage1.faiss").is_file()
    assert runs["true"]["index"]["run_id"] == run_id and runs["false"]["index"] is None
    for key in ("t2v/R1", "t2v/R5", "t2v/MnR", "v2t/R1", "v2t/MnR"):
        assert runs["true"]["metrics"][key] == runs["false"]["metrics"][key], key
    # the index keeps frame embeddings, and evaluation can re-rank a shortlist by the frames before stage 2
    assert GalleryIndex.open(tmp_path / "downloaded" / run_id).has_frames
    out = run_pipeline(registered, capsys, "--model", version, "--manifest", str(registered["manifest"]),
                       "eval.mode=two_stage", "eval.topk=3", "eval.shortlist=6", f"index.cache={tmp_path}/downloaded")
    assert "of a frame-ranked top-6 (best 3 frames)" in out
    assert json.loads(report.read_text())["shortlist"] == {"videos": 6, "top_frames": 3}

    sheet = tmp_path / "sheet.png"
    out = run_pipeline(registered, capsys, "--model", version, "--top", "3", "--sheet", str(sheet),
                       "a red circle rises", f"index.cache={tmp_path}/downloaded", pipeline=search_pipeline)
    lines = out.splitlines()
    ranked = lines[lines.index(next(line for line in lines if line.strip().startswith("rank"))) + 1:][:3]
    assert [line.split()[0] for line in ranked] == ["1", "2", "3"]
    scores = [float(line.split()[1]) for line in ranked]
    assert scores == sorted(scores, reverse=True)
    width, height = png_size(sheet)
    assert width > height > 0  # three rows of frames
    # the search is a run beside the index's: the caption, the ranked videos and the contact sheet
    experiment = client.get_experiment_by_name("eval/bench")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    (searched,) = client.search_runs([experiment.experiment_id], filter_string="tags.job = 'search'")
    assert searched.info.status == "FINISHED" and f"/runs/{searched.info.run_id}" in out
    assert searched.data.params["query"] == "a red circle rises" and searched.data.tags["index_run"] == run_id
    assert {a.path for a in client.list_artifacts(searched.info.run_id)} == {"sheet.png", "hits.json"}
    hits = json.loads(Path(client.download_artifacts(searched.info.run_id, "hits.json", str(tmp_path))).read_text())
    assert [hit["rank"] for hit in hits] == [1, 2, 3]
    assert [hit["score"] for hit in hits] == pytest.approx(scores, abs=5e-4)  # as printed, to 3 decimals


@pytest.mark.slow
def test_a_model_with_non_finite_scores_fails_and_logs_no_metrics(registered, capsys, tmp_path):
    cfg = registered["cfg"]
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(tmp_path, model, optimizer, scheduler, step=1, epoch=1, best_score=100.0, config_yaml=to_yaml(cfg))
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(registered, capsys, "--model", str(tmp_path), "--manifest", str(registered["manifest"]),
                     "eval.benchmark=nan-model")
    assert exit_info.value.code == 1
    assert "scores are not finite" in capsys.readouterr().err
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name("eval/nan-model").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics == {}


def test_stage1_line_reads_the_recalls_it_was_given():
    metrics = {"stage1/gt_R10": 70.0, "stage1/gt_R20": 80.0, "stage1/full_top1_R10": 50.0, "stage1/full_top1_R20": 61.5}
    assert stage1_line(metrics) == ("top 10/20 hold the ground truth for 70.0/80.0%, "
                                    "the full score's top-1 for 50.0/61.5%")
    assert stage1_line({"stage1/gt_R10": 70.0}) == "top 10 hold the ground truth for 70.0%"
    assert stage1_line({"t2v/R1": 5.0}) == ""
