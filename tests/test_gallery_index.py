"""Gallery indexes: the stored features and FAISS search, two-stage retrieval through them, and the check
that an index read from MLflow (or its cached copy) holds the files its run logged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from hvd.config import IndexConfig, ModelConfig, load_config
from hvd.eval import retrieval
from hvd.eval.retrieval import rescore_gathered, rescore_videos, top_candidates, two_stage
from hvd.gallery import (
    ANN_FILE,
    FEATURES_FILE,
    INDEX_FILES,
    GalleryIndex,
    build_ann,
    ivf_lists,
    search_ann,
    write_index,
)
from hvd.model import VideoFeatures, build_model, build_tokenizer
from hvd.registry.flavor import sha256_file
from hvd.registry.index_links import HASH_PARAM, IndexIntegrityError, log_index, open_index
from hvd.search.query import search

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green", "white") for s in ("circle", "square", "bar")]


def random_unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def gallery():
    """A tiny HVD model, 12 captions and 30 videos of random frames (one clip shorter than the rest)."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg).eval()
    with torch.no_grad():
        text = model.encode_text(build_tokenizer(cfg, max_words=16)(CAPTIONS))
        mask = torch.ones(30, 6, dtype=torch.bool)
        mask[3, 4:] = False
        video = model.encode_video(torch.randn(30, 6, 3, 64, 64, generator=torch.Generator().manual_seed(1)), mask)
    return model, text, video


def test_index_round_trip_keeps_every_feature_and_reads_rows_in_any_order(gallery, tmp_path):
    model, _, video = gallery
    ids = [f"v{i:02d}" for i in range(len(video))]
    index = write_index(tmp_path / "idx", ids, video, model.video_embeddings(video), IndexConfig(), {"note": "x"})
    assert index.kind == "flat" and index.video_ids == ids and index.meta["note"] == "x"
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["videos"] == 30
    assert not (tmp_path / "idx.tmp").exists()
    reopened = GalleryIndex.open(tmp_path / "idx")
    for name, value in vars(reopened.features()).items():
        assert torch.equal(value, getattr(video, name)), name  # bit for bit, bools included
    rows = torch.tensor([17, 3, 3, 0])
    for name, value in vars(reopened.features(rows)).items():
        assert torch.equal(value, getattr(video[rows], name)), name
    assert torch.equal(reopened.embeddings(), model.video_embeddings(video))


def test_fields_without_elements_are_kept_empty(tmp_path):
    video = VideoFeatures(  # meanp's entities and most heads' frame views hold nothing
        frames=torch.randn(4, 3, 8), frame_mask=torch.ones(4, 3, dtype=torch.bool), patches=torch.zeros(4, 0, 8),
        patch_frames=torch.zeros(4, 0, 3, dtype=torch.bool), frame_views=torch.zeros(4, 0, 3, 8),
    )
    index = write_index(tmp_path / "idx", list("abcd"), video, random_unit(4, 8, 0), IndexConfig(), {})
    assert index.features(torch.tensor([2, 1])).patches.shape == (2, 0, 8)


def test_incomplete_index_folder_is_an_error_naming_what_is_missing(gallery, tmp_path):
    model, _, video = gallery
    write_index(tmp_path / "idx", [str(i) for i in range(30)], video, model.video_embeddings(video), IndexConfig(), {})
    (tmp_path / "idx" / FEATURES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'idx'}: missing {FEATURES_FILE}"):
        GalleryIndex.open(tmp_path / "idx")
    with pytest.raises(ValueError, match="3 video ids, 30 feature rows"):
        write_index(tmp_path / "other", ["a", "b", "c"], video, model.video_embeddings(video), IndexConfig(), {})


def test_flat_search_is_exact_and_ivf_past_the_threshold_finds_the_exact_neighbours():
    gallery, queries = random_unit(3000, 16, 0), random_unit(50, 16, 1)
    exact = top_candidates(queries @ gallery.T, 10)
    flat = build_ann(gallery.numpy(), IndexConfig(ivf_from=3001))
    assert isinstance(flat, faiss.IndexFlatIP)
    assert torch.equal(search_ann(flat, queries, 10)[1], exact)

    ivf = build_ann(gallery.numpy(), IndexConfig(ivf_from=3000, nprobe=4))
    assert isinstance(ivf, faiss.IndexIVF) and ivf.nlist == ivf_lists(3000) == 219 and ivf.nprobe == 4
    scores, rows = search_ann(ivf, queries, 10, nprobe=ivf.nlist)  # every list searched: exact again
    assert torch.equal(rows, exact)
    torch.testing.assert_close(scores, (queries @ gallery.T).gather(1, exact))
    _, few = search_ann(ivf, queries, 10, nprobe=4)  # 4 of 219 lists: approximate, a real trade
    found = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(few, exact, strict=True)]
    assert 0 < sum(found) < exact.numel()


def test_rescoring_gathered_rows_equals_rescoring_the_whole_gallery(gallery, monkeypatch):
    model, text, video = gallery
    candidates = top_candidates(model.text_embeddings(text) @ model.video_embeddings(video).T, 5)
    gathered = []
    fine = rescore_gathered(model, text, lambda rows: gathered.append(rows) or video[rows], candidates)
    assert len(gathered) == 2 and torch.equal(gathered[1], candidates.unique())  # a probe, then each video once
    torch.testing.assert_close(fine, rescore_videos(model, text, video, candidates), rtol=0, atol=1e-6)
    monkeypatch.setattr(retrieval, "GATHER_BYTES", 1)  # one query's candidates per block
    torch.testing.assert_close(rescore_gathered(model, text, video.__getitem__, candidates), fine, rtol=0, atol=1e-6)


def test_two_stage_through_a_flat_index_ranks_as_without_it(gallery, tmp_path):
    model, text, video = gallery
    index = write_index(tmp_path / "idx", [str(i) for i in range(30)], video, model.video_embeddings(video),
                        IndexConfig(), {})
    plain, indexed = two_stage(model, text, video, topk=5), two_stage(model, text, video, topk=5, index=index)
    assert torch.equal(indexed.rescored, plain.rescored)
    assert torch.equal(indexed.t2v.argsort(dim=1), plain.t2v.argsort(dim=1))
    assert torch.equal(indexed.v2t.argsort(dim=1), plain.v2t.argsort(dim=1))


def test_a_frame_index_stores_float16_frame_embeddings_that_the_search_shortlist_reads(gallery, tmp_path):
    model, text, video = gallery
    ids = [f"v{i:02d}" for i in range(30)]
    plain = write_index(tmp_path / "plain", ids, video, model.video_embeddings(video), IndexConfig(), {})
    framed = write_index(tmp_path / "framed", ids, video, model.video_embeddings(video), IndexConfig(), {},
                         model.frame_embeddings(video))
    assert not plain.has_frames and framed.has_frames
    rows = torch.tensor([3, 17, 29])
    stored, mask = framed.frame_embeddings(rows)
    assert stored.dtype == torch.float16 and torch.equal(mask, video.frame_mask[rows])
    torch.testing.assert_close(stored.float(), model.frame_embeddings(video[rows]), rtol=0, atol=1e-3)
    tokenizer = build_tokenizer(ModelConfig(), max_words=16)
    compared = 0
    for hits_from_stored, hits_from_features in zip(
        search(model, tokenizer, framed, CAPTIONS, topk=4, top=4, shortlist=12, top_frames=2),
        search(model, tokenizer, plain, CAPTIONS, topk=4, top=4, shortlist=12, top_frames=2), strict=True,
    ):  # the same frame scores but for float16 rounding
        stage1 = {hit.video_id: hit.stage1_score for hit in hits_from_features}
        for hit in hits_from_stored:
            assert hit.video_id not in stage1 or abs(hit.stage1_score - stage1[hit.video_id]) < 2e-3
            compared += hit.video_id in stage1
    assert compared >= 3 * len(CAPTIONS)  # most hits are the same videos


def test_frame_shortlist_reads_blocks_of_captions_and_scores_as_in_memory(gallery, monkeypatch):
    model, text, video = gallery
    sentence = model.text_embeddings(text)
    listed = top_candidates(sentence @ model.video_embeddings(video).T, 12)
    framed, best = retrieval.frame_shortlist(sentence, retrieval.embedded_frames(model, video.__getitem__), listed, 4, 2)
    expected = retrieval.frame_scores(sentence, model.frame_embeddings(video), video.frame_mask, listed, 2)
    torch.testing.assert_close(framed, expected, rtol=0, atol=1e-6)
    assert torch.equal(best, top_candidates(expected, 4))
    read = []
    monkeypatch.setattr(retrieval, "GATHER_BYTES", 1)  # one caption's shortlist per block
    gather = retrieval.embedded_frames(model, lambda rows: read.append(rows) or video[rows])
    blocked, _ = retrieval.frame_shortlist(sentence, gather, listed, 4, 2)
    torch.testing.assert_close(blocked, framed, rtol=0, atol=1e-6)
    assert len(read) == 1 + len(text) and all(len(rows) <= 12 for rows in read)  # a probe, then a caption a block


@pytest.mark.parametrize("shortlist", [0, 12])
def test_search_through_an_index_ranks_as_two_stage_with_or_without_a_frame_shortlist(gallery, tmp_path, shortlist):
    model, text, video = gallery
    ids = [f"v{i:02d}" for i in range(30)]
    index = write_index(tmp_path / "idx", ids, video, model.video_embeddings(video), IndexConfig(), {})
    tokenizer = build_tokenizer(ModelConfig(), max_words=16)
    found = search(model, tokenizer, index, CAPTIONS, topk=4, top=4, shortlist=shortlist, top_frames=2)
    staged = two_stage(model, text, video, topk=4, index=index, shortlist=shortlist, top_frames=2)
    for q, hits in enumerate(found):
        expected = staged.t2v[q].argsort(descending=True)[:4]
        assert [hit.video_id for hit in hits] == [ids[int(i)] for i in expected]
        torch.testing.assert_close(torch.tensor([hit.score for hit in hits]), staged.t2v[q, expected], rtol=0, atol=1e-5)
        # stage 1's score of each hit: the frames' when shortlisted (the merged ranking keeps it), else the index's
        stage1 = staged.coarse[q, expected]
        torch.testing.assert_close(torch.tensor([hit.stage1_score for hit in hits]), stage1, rtol=0, atol=1e-5)
    if shortlist:  # the frames chose other candidates than the mean frame for some caption
        assert not torch.equal(staged.rescored, two_stage(model, text, video, topk=4).rescored)


def test_an_hvp_index_stores_the_derived_video_side_that_search_reads_and_older_indexes_derive(tmp_path):
    """HVP-Net's frame and entity weights (`Head.video_side`) are stored by the index, read by search (their
    networks do not run again) and equal to deriving them; an index without them (built before) ranks alike."""
    torch.manual_seed(0)
    cfg = ModelConfig(head="hvp")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for parameter in model.head.parameters():  # the weight networks start near uniform: make them matter
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
        text = model.encode_text(build_tokenizer(cfg, max_words=16)(CAPTIONS))
        video = model.encode_video(torch.randn(20, 6, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    derived, ids = model.video_side(video), [f"v{i:02d}" for i in range(20)]
    assert isinstance(derived, model.head.video_side_type) and model.video_side(derived) is derived
    stored = write_index(tmp_path / "stored", ids, derived, model.video_embeddings(video), IndexConfig(), {})
    older = write_index(tmp_path / "older", ids, video, model.video_embeddings(video), IndexConfig(), {})
    rows = torch.tensor([7, 2, 7])
    read = stored.features(rows, kind=model.head.video_side_type)
    for name in model.head.video_side_type.field_names():
        assert torch.equal(getattr(read, name), getattr(derived[rows], name)), name
    assert type(older.features(rows, kind=model.head.video_side_type)) is VideoFeatures
    tokenizer, calls = build_tokenizer(cfg, max_words=16), []
    hook = model.head.matcher.patch_weight.register_forward_hook(lambda *_: calls.append(1))
    try:
        from_stored = search(model, tokenizer, stored, CAPTIONS, topk=4, top=4)
    finally:
        hook.remove()
    assert not calls  # the entity weights came from the index
    staged = two_stage(model, text, video, topk=4, index=stored)
    for q, (hits, old_hits) in enumerate(zip(from_stored, search(model, tokenizer, older, CAPTIONS, topk=4, top=4),
                                             strict=True)):
        expected = staged.t2v[q].argsort(descending=True)[:4]
        assert [hit.video_id for hit in hits] == [ids[int(i)] for i in expected] == [hit.video_id for hit in old_hits]
        torch.testing.assert_close(torch.tensor([hit.score for hit in hits]), staged.t2v[q, expected], rtol=0, atol=1e-5)


@pytest.fixture
def logged_index(gallery, tmp_path):
    """An index logged as an MLflow run's artifacts, as pipelines/index.py logs it: (cfg, location, the
    run's artifact folder, the tracking URI)."""
    model, _, video = gallery
    folder = tmp_path / "built"
    write_index(folder, [str(i) for i in range(30)], video, model.video_embeddings(video), IndexConfig(), {})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("eval/bench", str(tmp_path / "artifacts")))
    location = log_index(client, run.info.run_id, folder)
    artifacts = Path(local_file_uri_to_path(run.info.artifact_uri)) / "index"
    cfg = load_config(None, [f"index.cache={tmp_path}/cache"])
    return cfg, location, artifacts, uri


def plant(folder: Path, name: str) -> str:
    """Replace one index file with another valid one, as whoever can write the artifact store could; returns
    its sha256."""
    other = F.normalize(torch.randn(30, 8), dim=-1).numpy()
    if name == ANN_FILE:
        faiss.write_index(build_ann(other, IndexConfig()), str(folder / name))
    else:
        arrays = safetensors.numpy.load_file(str(folder / name))
        arrays["embedding"] = arrays["embedding"][::-1].copy()  # every video's embedding moved to another row
        safetensors.numpy.save_file(arrays, str(folder / name))
    return sha256_file(folder / name)


def test_a_logged_index_records_its_files_hashes_and_opens_from_mlflow_and_its_cache(logged_index):
    cfg, location, artifacts, uri = logged_index
    run_id = location.removeprefix("runs:/").split("/")[0]
    params = MlflowClient(uri).get_run(run_id).data.params
    assert {key: value for key, value in params.items() if key.startswith(HASH_PARAM)} == {
        HASH_PARAM + name: sha256_file(artifacts / name) for name in INDEX_FILES}
    downloaded = open_index(location, cfg, uri)
    assert downloaded.folder == Path(cfg.index.cache) / run_id and len(downloaded) == 30
    assert len(open_index(location, cfg, uri)) == 30  # the cached copy


@pytest.mark.parametrize("name", [ANN_FILE, FEATURES_FILE])
def test_an_index_file_replaced_in_the_artifact_store_is_refused_naming_it(logged_index, name):
    cfg, location, artifacts, uri = logged_index
    logged = sha256_file(artifacts / name)
    planted = plant(artifacts, name)
    changed = f"{name}: sha256 {logged} when logged, {planted} now"
    with pytest.raises(IndexIntegrityError, match=f"index {location}: .*{changed}"):
        open_index(location, cfg, uri)
    assert not any(Path(cfg.index.cache).glob("*/" + name))  # the planted copy never entered the cache


@pytest.mark.parametrize("name", [ANN_FILE, FEATURES_FILE])
def test_a_cached_copy_changed_after_download_is_refused_naming_it(logged_index, name):
    cfg, location, _, uri = logged_index
    cached = open_index(location, cfg, uri).folder
    logged = sha256_file(cached / name)
    planted = plant(cached, name)
    changed = f"{name}: sha256 {logged} when logged, {planted} now"
    with pytest.raises(IndexIntegrityError, match=f"its copy in {cached}.*{changed}"):
        open_index(location, cfg, uri)


def test_an_index_run_that_records_no_hashes_is_refused(logged_index, tmp_path):
    cfg, _, artifacts, uri = logged_index
    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("eval/bench").experiment_id)
    client.log_artifacts(run.info.run_id, str(artifacts), "index")  # as hvd logged indexes before hashes
    shutil.rmtree(cfg.index.cache, ignore_errors=True)
    with pytest.raises(IndexIntegrityError, match="records no sha256 of its files"):
        open_index(f"runs:/{run.info.run_id}/index", cfg, uri)
