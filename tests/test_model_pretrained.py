"""Weights written by `save_weights` come back through `model.pretrained=PATH`; foreign and broken files too, or fail clearly."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from hvd.config import ModelConfig
from hvd.model import build_model, build_tokenizer, save_weights
from hvd.model.presets import preset_config

CAPTIONS = ["a red square slides left", "a blue circle grows"]


def scores_of(model) -> torch.Tensor:
    tokens = build_tokenizer(ModelConfig(), 32)(CAPTIONS)
    frames = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model.score(model.encode_text(tokens), model.encode_video(frames))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HVD model whose every weight differs from a fresh one, saved to a file."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = save_weights(model, tmp_path_factory.mktemp("weights") / "tiny-hvd.safetensors")
    return model, path


def test_saved_weights_load_back_through_model_pretrained(trained):
    model, path = trained
    torch.manual_seed(1)  # a different random initialisation underneath
    loaded = build_model(ModelConfig(pretrained=str(path)))
    for (name, expected), (_, actual) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, actual), name
    torch.testing.assert_close(scores_of(loaded), scores_of(model))


def test_a_meanp_model_takes_the_backbone_of_a_clip_checkpoint(trained, tmp_path):
    model, path = trained
    backbone_only = {k: v for k, v in load_file(path).items() if not k.startswith("head.")}
    clip_file = tmp_path / "clip.safetensors"
    save_file(backbone_only, clip_file)
    loaded = build_model(ModelConfig(head="meanp", pretrained=str(clip_file)))
    assert torch.equal(loaded.backbone.clip.visual.proj, model.backbone.clip.visual.proj)


def test_open_clip_training_checkpoints_load(trained, tmp_path):
    """open_clip's trainer writes {'state_dict': ...} with DDP's 'module.' prefix; open_clip's loader strips it."""
    model, _ = trained
    state = {"module." + k: v for k, v in model.backbone.clip.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": state}, path)
    loaded = build_model(ModelConfig(pretrained=str(path)))
    assert torch.equal(loaded.backbone.clip.logit_scale, model.backbone.clip.logit_scale)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_torchscript_archives_like_openai_clip_files_load(trained, tmp_path):
    model, _ = trained
    clip = open_clip.CLIP(**preset_config("tiny", quick_gelu=True))  # a plain CLIP, as OpenAI shipped them
    clip.load_state_dict(model.backbone.clip.state_dict())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(clip), path)
    loaded = build_model(ModelConfig(head="meanp", pretrained=str(path)))
    assert torch.equal(
        loaded.backbone.clip.token_embedding.weight, model.backbone.clip.token_embedding.weight
    )


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model(ModelConfig(pretrained=str(missing)))


def test_shape_mismatch_names_the_path(trained, tmp_path):
    _, path = trained
    tensors = load_file(path)
    tensors["text_projection"] = torch.zeros(128, 64)
    wrong = tmp_path / "wrong-shape.safetensors"
    save_file(tensors, wrong)
    with pytest.raises(ValueError, match=rf"{re.escape(str(wrong))}.*size mismatch for text_projection"):
        build_model(ModelConfig(pretrained=str(wrong)))


def test_files_of_other_models_name_the_path(trained, tmp_path):
    _, path = trained
    tensors = load_file(path)
    del tensors["visual.conv1.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, partial)
    with pytest.raises(ValueError, match=rf"{re.escape(str(partial))}.*missing: visual.conv1.weight"):
        build_model(ModelConfig(pretrained=str(partial)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*head weights do not fit"):
        build_model(ModelConfig(head="meanp", pretrained=str(path)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        build_model(ModelConfig(pretrained=str(garbage)))


def test_weights_are_written_as_safetensors_only(trained, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_weights(model, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


class WritesMarker:
    """A pickle that creates the file at `path` when a full unpickler loads it: a hostile checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def hostile_zip(path, marker, members: dict[str, bytes]):
    """A `torch.save` zip whose data.pkl runs a command on load, with extra `members` added beside it."""
    torch.save({"visual.proj": WritesMarker(marker)}, path)
    with zipfile.ZipFile(path, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    return path


@pytest.mark.parametrize(
    "members",
    [
        {},
        {"extra/constants.pkl": pickle.dumps(())},
        {"constants.pkl": pickle.dumps(()), "code/__torch__/m.py": b""},
    ],
    ids=["plain", "constants_pkl", "torchscript_layout"],
)
def test_a_hostile_pickle_is_refused_without_running(tmp_path, members):
    """Whatever its members say, no code in the file runs. A member ending in constants.pkl (not the archive's
    own, which torch.load would hand to TorchScript) once switched the loader to weights_only=False."""
    marker = tmp_path / "pwned"
    path = hostile_zip(tmp_path / "hostile.pt", marker, members)
    with pytest.raises(ValueError, match=rf"model\.pretrained={re.escape(str(path))}: refused"):
        build_model(ModelConfig(pretrained=str(path)))
    assert not marker.exists()


def test_no_code_loads_pickles_with_weights_only_false():
    """torch.load(weights_only=False) runs whatever a file names; the repository never asks for it."""
    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for folder in ("hvd", "pipelines", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        if re.search(r"weights_only\s*=\s*False", path.read_text())
    ]
    assert not offenders
