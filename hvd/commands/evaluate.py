r"""Evaluate a trained model on any benchmark: text-to-video and video-to-text R@1/5/10, MdR, MnR.

    python pipelines/evaluate.py --model models:/hvd@champion --manifest data/msrvtt/manifest.jsonl
    python pipelines/evaluate.py --model models:/hvd/3 --shards data/shards-demo eval.mode=two_stage \
        eval.compare=true

--model: models:/NAME@ALIAS (@champion, @latest), models:/NAME/VERSION, runs:/RUN_ID/model, or a Ray
Train checkpoint directory (one holding state.pt). MLflow URIs resolve against tracking.uri.
--manifest: a benchmark manifest (JSONL); its videos are decoded with the model's own frame settings
into eval.cache, once (re-runs reuse the shards). Videos that cannot be decoded are excluded and listed.
--shards: shards already prepared by pipelines/prepare.py, used as they are.
The frame sampling (data.num_frames, sample_mode, frame_size, frame_codec, jpeg_quality) and
data.max_words always come from the model's training config; data.decode_* set the decoding parallelism.

Encoding runs on a Ray Data actor pool (one model per actor; GPU actors when the cluster has GPUs).
Scoring: eval.mode=exhaustive runs every (caption, video) pair through the full HVD score, chunked to
model.score_budget_mb; eval.mode=two_stage ranks all videos by global embeddings (one matrix product,
or the FAISS search of the gallery index that pipelines/index.py built for this model version and
benchmark split, whose stored features are then used instead of encoding the videos; index.use=false
ignores it) and rescores each query's eval.topk best with the full score; the top-k always rank above the rest,
which keep their stage-1 order. eval.compare=true runs exhaustive too and reports it under exhaustive/.
Metrics, as CLIP4Clip and X-Pool compute them: t2v has one query per caption; v2t one per video, ranking
caption groups scored by their best caption; MdR is np.median; ties rank pessimistically (an equal score
counts as better than the ground truth). eval.dsl=true adds dual-softmax
numbers under dsl_ names (exhaustive scores only).

Output: a printed table; <eval.out>/<benchmark>/<model>-v<version>-<mode>/report.json with recall@K
curves, a similarity heat map and, for eval.explain_queries captions, what the head weighed each frame by
(hvd: the frames FFSM kept and the PFCM clusters over them; xpool: its frame attention; eercf: its text
gate); and an MLflow run in experiment eval/<benchmark> (benchmark:
eval.benchmark, else the manifest's folder name) tagged with model_name, model_version and source_run.
"""

from __future__ import annotations

from hvd.cli import add_job_flags, fail, parse_args
from hvd.errors import HvdError

SECTIONS = ("eval", "index", "data", "tracking")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_job_flags)
    # the job's imports (torch, Ray, MLflow) only once the arguments are good: see hvd.cli
    from hvd.eval.job import evaluate, summary_text

    try:
        outcome = evaluate(cfg, args.model, manifest=args.manifest, shards=args.shards)
    except (HvdError, FileNotFoundError, ValueError) as err:
        fail(err)
    print(summary_text(outcome, cfg))

