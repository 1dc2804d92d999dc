"""Where a model version's gallery indexes are: MLflow artifacts that a tag on the version points at.

`pipelines/index.py` logs an index folder (see `hvd.gallery`) as the `index/` artifacts of
its run and tags the model version `index.<benchmark>.<split>` with their URI (a runs:/ model: its
training run). Evaluations and searches look the tag up and keep a copy under `index.cache`/<run id>.

The index run's params record each file's sha256 (`sha256.<file>`; MLflow never lets a logged param
change), so the tracking store vouches for what the artifact store holds: `open_index` refuses a
download, or a cached copy, whose files hash otherwise, and an index run without that record.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from hvd.config import Config
from hvd.data.folders import building
from hvd.data.shards import ShardSummary
from hvd.errors import HvdError
from hvd.gallery import INDEX_FILES, GalleryIndex
from hvd.registry.flavor import changed_files, sha256_file
from hvd.registry.runs import active_tracking_uri, log_params
from hvd.registry.sources import ModelSource

logger = logging.getLogger(__name__)

ARTIFACT_PATH = "index"
HASH_PARAM = "sha256."  # the index run's params sha256.index.json, sha256.stage1.faiss, ...


class IndexIntegrityError(HvdError, ValueError):
    """An index whose files are not the ones its run logged, or whose run records none; says which and why."""


def index_tag(benchmark: str, split: str) -> str:
    return f"index.{benchmark}.{split}"


def log_index(client: MlflowClient, run_id: str, folder: Path) -> str:
    """Record the index folder's sha256 as the run's params, then log its files as the run's `index/`
    artifacts; returns their URI."""
    log_params(client, run_id, {HASH_PARAM + name: sha256_file(folder / name) for name in INDEX_FILES})
    client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
    return f"runs:/{run_id}/{ARTIFACT_PATH}"


def link_index(client: MlflowClient, source: ModelSource, tag: str, artifact_uri: str) -> str:
    """Tag the model version (else the training run) with where its index lies; says what was tagged."""
    if source.version.isdigit():
        client.set_model_version_tag(source.name, source.version, tag, artifact_uri)
        return f"model version {source.name}/{source.version}"
    if source.source_run:
        client.set_tag(source.source_run, tag, artifact_uri)
        return f"run {source.source_run}"
    return ""


def linked_indexes(source: ModelSource, tracking_uri: str) -> dict[str, str]:
    """`index.<benchmark>.<split>` tags of the model version (or its run): tag -> artifact URI."""
    client = MlflowClient(tracking_uri)
    if source.version.isdigit():
        tags = client.get_model_version(source.name, source.version).tags
    elif source.source_run:
        tags = client.get_run(source.source_run).data.tags
    else:
        return {}
    return {key: value for key, value in tags.items() if key.startswith("index.")}


def open_index(location: str, cfg: Config, tracking_uri: str) -> GalleryIndex:
    """An index from its artifact URI (downloaded once into `index.cache`/<run id>) or a local folder (yours:
    opened unchecked). A download, and the cached copy at every open, must hash as its run recorded."""
    if Path(location).is_dir():
        return GalleryIndex.open(location)
    if not location.startswith("runs:/"):
        raise ValueError(f"index {location!r}: neither a folder nor a runs:/RUN_ID/{ARTIFACT_PATH} URI")
    run_id = location.removeprefix("runs:/").split("/", 1)[0]
    recorded = _recorded_hashes(location, run_id, tracking_uri)
    folder = Path(cfg.index.cache) / run_id
    with building(folder, "index download", Path.is_dir) as staging:
        if staging is None:
            _check(folder, recorded, f"index {location} (its copy in {folder}; delete it to download again)")
        else:
            with active_tracking_uri(tracking_uri):
                downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging)))
            for file in downloaded.iterdir():  # out of the artifact path's own folder, up into the staging folder
                file.rename(staging / file.name)
            downloaded.rmdir()
            _check(staging, recorded, f"index {location}")  # before it enters the cache
    return GalleryIndex.open(folder)


def _recorded_hashes(location: str, run_id: str, tracking_uri: str) -> dict[str, str]:
    params = MlflowClient(tracking_uri).get_run(run_id).data.params
    recorded = {key.removeprefix(HASH_PARAM): value for key, value in params.items()
                if key.startswith(HASH_PARAM)}
    if not recorded:
        raise IndexIntegrityError(
            f"index {location}: run {run_id} records no sha256 of its files (built before hvd recorded "
            "them), so nothing shows they are the files it logged; build it again with pipelines/index.py"
        )
    return recorded


def _check(folder: Path, recorded: dict[str, str], what: str) -> None:
    if changed := changed_files({name: folder / name for name in INDEX_FILES}, recorded):
        raise IndexIntegrityError(f"{what}: its files are not the ones logged ({'; '.join(changed)}); "
                                  "the stored copy was replaced, so it is not used")


def matching_index(
    cfg: Config, source: ModelSource, benchmark: str, shards: Path, tracking_uri: str
) -> GalleryIndex | None:
    """The model version's index of this benchmark split, when it indexes these very shards' videos
    decoded the same way; says why an index it found is not used."""
    location = linked_indexes(source, tracking_uri).get(index_tag(benchmark, cfg.eval.split))
    if location is None:
        return None
    index = open_index(location, cfg, tracking_uri)
    summary = ShardSummary.read(shards)
    if index.meta["dataset_fingerprint"] != summary.manifest_fingerprint:
        logger.info(f"index {location} not used: it indexes another version of {benchmark}")
        return None
    if index.meta["frame_spec"] != summary.frame_spec:
        logger.info(f"index {location} not used: its frames were sampled otherwise")
        return None
    return index
