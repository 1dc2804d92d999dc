r"""Index a gallery once: encode a benchmark split with a trained model and keep it, with a FAISS index.

    python pipelines/index.py --model models:/hvd@champion --shards data/shards-demo
    python pipelines/index.py --model models:/hvd/3 --manifest data/my-videos/manifest.jsonl eval.split=test

--model, --manifest and --shards as for pipelines/evaluate.py; the eval.split videos are indexed.
Encoding runs on a Ray Data actor pool, as evaluation does. The index keeps every video's features (for
stage 2) and first-stage embedding, and a FAISS inner-product index over those: exact (flat) below
index.ivf_from videos, IVF above (index.nprobe lists searched per query).

It is logged as the `index/` artifacts of an MLflow run (experiment eval/<benchmark>, tag job=index), and
the model version gets the tag index.<benchmark>.<split> with their URI. From then on,
`pipelines/evaluate.py ... eval.mode=two_stage` on the same benchmark split takes the videos' features
and stage 1 from it instead of encoding them, and `pipelines/search.py` searches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvd.cli import add_job_flags, fail, parse_args
from hvd.errors import HvdError

if TYPE_CHECKING:
    from hvd.search.index_job import IndexOutcome

SECTIONS = ("eval", "index", "data", "tracking")


def summary_text(outcome: IndexOutcome) -> str:
    index, meta = outcome.index, outcome.index.meta
    kind = f"IVF, {meta['ivf_lists']} lists, nprobe {meta['nprobe']}" if index.kind == "ivf" else "flat, exact"
    return "\n".join([
        f"indexed    {len(index)} videos of the {meta['split']} split of {meta['benchmark']} "
        f"({kind}; {meta['ann_bytes'] / 2**20:.1f} MiB index, {meta['features_bytes'] / 2**20:.1f} MiB features)",
        f"timings    encode {outcome.timings_s['encode_s']:.1f} s, build {outcome.timings_s['build_s']:.1f} s",
        f"MLflow     {outcome.artifact_uri}" + (f", tagged on {outcome.linked_to}" if outcome.linked_to else
                                                " (a checkpoint has no version to tag: pass it as --index)"),
        f"run page   {outcome.run_url}",
        f"local copy {index.folder}",
    ])


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(__doc__, SECTIONS, argv, add_flags=add_job_flags)
    # the job's imports (torch, Ray, MLflow) only once the arguments are good: see hvd.cli
    from hvd.search.index_job import build_index

    try:
        outcome = build_index(cfg, args.model, manifest=args.manifest, shards=args.shards)
    except (HvdError, FileNotFoundError, ValueError) as err:
        fail(err)
    print(summary_text(outcome))

