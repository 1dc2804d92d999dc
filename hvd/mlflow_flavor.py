"""The `hvd` MLflow model flavor: a logged model is tensors and YAML, and loading one never unpickles.

MLflow's PyTorch flavor pickles the module, and unpickling runs whatever code the file names: a model
version planted in a shared registry (an MLflow server has no authentication of its own) would run on
every machine that evaluates it. A model in this flavor is the `RetrievalModel` state dict as
safetensors plus the resolved training config; `load_model` reads those two files and nothing else, and
refuses a model stored any other way with a message that says why.

The logged model's folder:
    MLmodel              flavors.hvd: the format, the two file names, the hvd version that wrote them
    model.safetensors    backbone and head weights
    config.yaml          the training config: which preset and head to build, how frames were sampled
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hvd.config import Config, ConfigError, config_from_yaml, to_yaml
from hvd.model import RetrievalModel, rebuild_model

FLAVOR = "hvd"
FORMAT = "safetensors"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class ModelFormatError(ValueError):
    """A logged model that is not in the hvd flavor, or whose files do not make a model; names the URI."""


def save_model(model: RetrievalModel, cfg: Config, path: str, mlflow_model: Model | None = None) -> None:
    """MLflow's flavor interface, called by `mlflow.models.Model.log`: write the model's folder at `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=False)
    save_file({key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    mlflow_model = mlflow_model or Model()
    mlflow_model.add_flavor(FLAVOR, format=FORMAT, weights=WEIGHTS_FILE, config=CONFIG_FILE, hvd_version=version("hvd"))
    mlflow_model.save(str(folder / MLMODEL_FILE_NAME))


def log_model(model: RetrievalModel, cfg: Config, registered_model_name: str) -> ModelInfo:
    """Log the model to the active run as `model` and register it as a new version of `registered_model_name`."""
    return Model.log(artifact_path=None, name="model", flavor=sys.modules[__name__], flavor_name=FLAVOR, model=model, cfg=cfg,
                     registered_model_name=registered_model_name)


def load_model(model_uri: str) -> tuple[RetrievalModel, Config]:
    """The model at `model_uri` (any MLflow model URI) in eval mode, and its training config."""
    with tempfile.TemporaryDirectory() as tmp:
        flavor = _hvd_flavor(model_uri, tmp)
        if flavor.get("format") != FORMAT or flavor.get("weights") != WEIGHTS_FILE or flavor.get("config") != CONFIG_FILE:
            raise ModelFormatError(f"{model_uri}: its hvd flavor names other files or formats than hvd writes: {flavor}")
        weights = mlflow.artifacts.download_artifacts(f"{model_uri}/{WEIGHTS_FILE}", dst_path=tmp)
        config = mlflow.artifacts.download_artifacts(f"{model_uri}/{CONFIG_FILE}", dst_path=tmp)
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as err:
            raise ModelFormatError(f"{model_uri}: {WEIGHTS_FILE} is not a safetensors file ({err})") from None
        try:
            cfg = config_from_yaml(Path(config).read_text())
        except ConfigError as err:
            raise ModelFormatError(f"{model_uri}: {CONFIG_FILE} is not a valid hvd config ({err})") from None
    try:
        model = rebuild_model(cfg.model, state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ModelFormatError(f"{model_uri}: the weights do not fit model.preset={cfg.model.preset}, "
                               f"model.head={cfg.model.head} ({reason})") from None
    return model, cfg


def _hvd_flavor(model_uri: str, tmp: str) -> dict:
    meta = Model.load(mlflow.artifacts.download_artifacts(f"{model_uri}/{MLMODEL_FILE_NAME}", dst_path=tmp))
    if FLAVOR not in meta.flavors:
        stored = ", ".join(sorted(meta.flavors)) or "no flavor"
        raise ModelFormatError(
            f"{model_uri}: stored as MLflow flavor(s) {stored}, not hvd's tensor format. hvd never unpickles a "
            "model file, since loading a pickle runs the code inside it; evaluate the run's checkpoint folder "
            "instead (--model PATH/TO/checkpoint_...) or train it again with this version of hvd"
        )
    return meta.flavors[FLAVOR]
