"""The `hvd` MLflow model flavor: a logged model is tensors and YAML, and loading one never unpickles.

MLflow's PyTorch flavor pickles the module, and unpickling runs whatever code the file names: a model
version planted in a shared registry would run on every machine that evaluates it. A model in this
flavor is the `RetrievalModel` state dict as safetensors plus the resolved training config; `load_model`
reads those two files and nothing else, and refuses a model stored any other way with a message that
says why.

Whoever can write the artifact store (a bucket, a shared folder) can still swap one model's weights for
other valid ones. So `log_model` records each file's sha256 as a tag of the logged model, in the
tracking store, and `load_model` refuses files whose hash is not the recorded one. A model logged before
hashes were recorded has no such tags: it loads, with a warning that its files went unchecked.

Every saved model also has MLflow's standard face, a `pyfunc` flavor whose loader is a module of this
package (`hvd.search.pyfunc`, which reads the same two files with the same checks), never a pickled
Python object: `mlflow.pyfunc.load_model(uri).predict(captions)` ranks the gallery linked to the version.

The logged model's folder:
    MLmodel              flavors.hvd: the format, the two file names and their sha256, the hvd version
                         that wrote them (the hashes that count are the logged model's tags);
                         flavors.python_function: the loader module and the search settings it reads
                         (`PYFUNC_CONFIG`); the signature (`SIGNATURE`)
    model.safetensors    backbone and head weights
    config.yaml          the training config: which preset and head to build, how frames were sampled
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModel
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hvd.config import Config, ConfigError, config_from_yaml, flatten, to_yaml
from hvd.errors import InputError
from hvd.model import RetrievalModel, rebuild_model

FLAVOR = "hvd"
FORMAT = "safetensors"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
HASH_TAG = "sha256."  # logged-model tags sha256.model.safetensors and sha256.config.yaml

PYFUNC_LOADER = "hvd.search.pyfunc"
PYFUNC_TOP = 10  # videos per caption when predict is given no `top`
# The input column is unnamed: MLflow matches a list or a Series to a named column by name, and refuses them.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string", "caption"), ColSpec("long", "rank"), ColSpec("string", "video_id"),
                    ColSpec("double", "score"), ColSpec("double", "stage1_score")]),
    params=ParamSchema([ParamSpec("top", "long", PYFUNC_TOP)]),
)
# The config keys the pyfunc's search reads, with their defaults: which linked index, where it is downloaded,
# stage 1's candidates; `mlflow.pyfunc.load_model(uri, model_config={...})` overrides them.
PYFUNC_CONFIG = {key: value for key, value in flatten(Config()).items()
                 if key in ("eval.benchmark", "eval.split", "eval.topk", "index.nprobe", "index.cache")}


class ModelFormatError(InputError, ValueError):
    """A logged model that is not in the hvd flavor, whose files do not make a model, or whose files are not
    the ones logged; names the URI."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def changed_files(files: dict[str, Path], recorded: dict[str, str]) -> list[str]:
    """`NAME: sha256 X when logged, Y now` for each file whose content is not the recorded one; a file with
    no record, or none on disk, counts as changed."""
    changed = []
    for name, path in files.items():
        found = sha256_file(path) if path.is_file() else "no such file"
        if recorded.get(name) != found:
            changed.append(f"{name}: sha256 {recorded.get(name, '(none recorded)')} when logged, {found} now")
    return changed


def save_model(model: RetrievalModel, cfg: Config, path: str, mlflow_model: Model | None = None) -> None:
    """MLflow's flavor interface, called by `mlflow.models.Model.log`: write the model's folder at `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=False)
    save_file({key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    hashes = {name: sha256_file(folder / name) for name in (WEIGHTS_FILE, CONFIG_FILE)}
    mlflow_model = mlflow_model or Model()
    mlflow_model.add_flavor(FLAVOR, format=FORMAT, weights=WEIGHTS_FILE, config=CONFIG_FILE, sha256=hashes,
                            hvd_version=version("hvd"))
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=PYFUNC_LOADER, model_config=PYFUNC_CONFIG)
    mlflow_model.signature = SIGNATURE
    mlflow_model.save(str(folder / MLMODEL_FILE_NAME))


def log_model(model: RetrievalModel, cfg: Config, registered_model_name: str) -> ModelInfo:
    """Log the model to the active run as `model`, register it as a new version of `registered_model_name`,
    and tag the logged model with its files' sha256 (see the module's docstring)."""
    info = Model.log(artifact_path=None, name="model", flavor=sys.modules[__name__], flavor_name=FLAVOR,
                     model=model, cfg=cfg, registered_model_name=registered_model_name)
    tags = {HASH_TAG + name: digest for name, digest in info.flavors[FLAVOR]["sha256"].items()}
    MlflowClient().set_logged_model_tags(info.model_id, tags)
    return info


def load_model(model_uri: str) -> tuple[RetrievalModel, Config]:
    """The model at `model_uri` (any MLflow model URI) in eval mode, and its training config; refused when
    the tracking store records other sha256 for its files than the artifact store now holds."""
    logged = _logged_model(model_uri)
    source = logged.artifact_location if logged else model_uri  # the files of the model the store names
    with tempfile.TemporaryDirectory() as tmp:
        # MLmodel first: a model in another flavor is refused before its (pickled) files are downloaded
        _hvd_flavor(model_uri, Path(mlflow.artifacts.download_artifacts(f"{source}/{MLMODEL_FILE_NAME}", dst_path=tmp)))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            mlflow.artifacts.download_artifacts(f"{source}/{name}", dst_path=tmp)
        return _read_model(model_uri, Path(tmp), logged)


def load_local_model(folder: Path, logged: LoggedModel) -> tuple[RetrievalModel, Config]:
    """`load_model` for a copy of the logged model's folder already on disk (what MLflow hands a pyfunc
    loader), checked against the tags that the tracking store holds for `logged`."""
    model_uri = f"models:/{logged.model_id}"
    _hvd_flavor(model_uri, folder / MLMODEL_FILE_NAME)
    return _read_model(model_uri, folder, logged)


def _read_model(model_uri: str, folder: Path, logged: LoggedModel | None) -> tuple[RetrievalModel, Config]:
    tags = logged.tags if logged else {}
    recorded = {key.removeprefix(HASH_TAG): value for key, value in tags.items() if key.startswith(HASH_TAG)}
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not recorded:
        warnings.warn(f"{model_uri}: the tracking store records no sha256 of its files (logged before "
                      "hvd recorded them), so nothing checks that they are the files logged",
                      stacklevel=3)
    elif changed := changed_files({WEIGHTS_FILE: weights, CONFIG_FILE: config}, recorded):
        raise ModelFormatError(f"{model_uri}: its files are not the ones logged ({'; '.join(changed)}); "
                               "the artifact store's copy was replaced, so it is not loaded")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ModelFormatError(f"{model_uri}: {WEIGHTS_FILE} is not a safetensors file ({err})") from None
    try:
        cfg = config_from_yaml(config.read_text())
    except ConfigError as err:
        raise ModelFormatError(f"{model_uri}: {CONFIG_FILE} is not a valid hvd config ({err})") from None
    try:
        model = rebuild_model(cfg.model, state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ModelFormatError(f"{model_uri}: the weights do not fit model.preset={cfg.model.preset}, "
                               f"model.head={cfg.model.head} ({reason})") from None
    return model, cfg


def _logged_model(model_uri: str) -> LoggedModel | None:
    """The logged model that `model_uri` names, looked up in the tracking store (MLmodel names one too, but
    whoever can replace the files can rewrite it); None for plain run artifacts or a path."""
    client = MlflowClient()
    if model_uri.startswith("models:/"):
        found = get_model_name_and_version(client, model_uri)
        if len(found) == 1:  # models:/<model id>
            return client.get_logged_model(found[0])
        registered = client.get_model_version(*found)
        origin = registered.source or ""  # SQLite stores leave model_id empty; source is models:/<id>
        from_source = origin.removeprefix("models:/") if origin.startswith("models:/m-") else None
        model_id = registered.model_id or from_source
        return client.get_logged_model(model_id) if model_id else None
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri.removeprefix("runs:/").rstrip("/").partition("/")
        experiment = client.get_run(run_id).info.experiment_id
        logged = client.search_logged_models(
            [experiment], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'", max_results=1)
        return logged[0] if logged else None
    return None


def _hvd_flavor(model_uri: str, mlmodel: Path) -> None:
    """Refuse a model whose MLmodel file names no hvd flavor, or other files or formats than hvd writes."""
    meta = Model.load(str(mlmodel))
    if FLAVOR not in meta.flavors:
        stored = ", ".join(sorted(meta.flavors)) or "no flavor"
        raise ModelFormatError(
            f"{model_uri}: stored as MLflow flavor(s) {stored}, not hvd's tensor format. hvd never unpickles a "
            "model file, since loading a pickle runs the code inside it; evaluate the run's checkpoint folder "
            "instead (--model PATH/TO/checkpoint_...) or train it again with this version of hvd"
        )
    flavor = meta.flavors[FLAVOR]
    if flavor.get("format") != FORMAT or flavor.get("weights") != WEIGHTS_FILE or flavor.get("config") != CONFIG_FILE:
        raise ModelFormatError(f"{model_uri}: its hvd flavor names other files or formats than hvd writes: {flavor}")
