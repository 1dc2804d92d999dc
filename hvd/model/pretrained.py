"""Model weights in and out of files, through open_clip's own checkpoint loading.

A file we write is an open_clip state dict (so open_clip can read its backbone as it is) plus the
head's weights under `head.`; it loads back through `model.pretrained=PATH` like any CLIP checkpoint
(an open_clip training checkpoint, an OpenAI TorchScript file, a safetensors file), which then leaves
the head as initialised.

A weights file may come from anywhere, and unpickling a file can run any code it names. So a file is read
as tensors only: safetensors, or `torch.load(weights_only=True)`, which refuses any pickle that needs more
than tensors and plain values. OpenAI's TorchScript files are read by TorchScript's own loader, which builds
TorchScript modules and never imports Python objects; a file that looks like one and fails there is refused,
never retried with a full unpickler.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from safetensors.torch import save_file

from hvd.errors import InputError
from hvd.model.model import RetrievalModel
from hvd.runtime.durable import atomic_file

HEAD_PREFIX = "head."
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # OpenAI's files hold these too


class RefusedWeightsError(InputError, ValueError):
    """A weights file that is not read at all: reading it could run code it carries."""


def _torchscript_layout(path: Path) -> bool | None:
    """True for a zip holding, under one folder, TorchScript's `code/` sources beside its `constants.pkl`;
    False for a zip with a `constants.pkl` but no such `code/` (anyone can add that member to a `torch.save`
    zip, and torch.load takes it for TorchScript); None for anything else."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    roots = {name[: -len("constants.pkl")] for name in names if name.endswith("constants.pkl")}
    if not roots:
        return None
    return any(name.startswith(root + "code/") for name in names for root in roots)


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _torchscript_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP file's weights, as open_clip's CLIP names them (OpenAI's names are the same)."""
    try:
        module = torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # no fallback to a full unpickler: there a hostile archive would run code
        raise RefusedWeightsError(
            f"model.pretrained={file}: refused: it is laid out as a TorchScript archive, but TorchScript "
            f"cannot load it ({_one_line(err)})"
        ) from err
    state = module.state_dict()
    for key in _TORCHSCRIPT_EXTRAS:
        state.pop(key, None)
    return state


def _load_backbone(clip: open_clip.CLIP, file: Path) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """Load `file` into `clip` (strict=False): the mismatched keys, and the state dict when read here."""
    layout = _torchscript_layout(file)
    if layout is False:
        raise RefusedWeightsError(
            f"model.pretrained={file}: refused: it holds a TorchScript constants.pkl but no TorchScript "
            "code/, so it is neither a TorchScript archive nor a plain weights file"
        )
    if layout:
        state = _torchscript_state_dict(file)
        resize_pos_embed(state, clip)  # as open_clip's loader does, for a preset of another image size
        resize_text_pos_embed(state, clip)
        return clip.load_state_dict(state, strict=False), state
    try:
        return open_clip.load_checkpoint(clip, str(file), strict=False, weights_only=True), None
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to load the file unsafely instead; the paragraph after it says why
        paragraphs = [part for part in str(err).split("\n\n") if part.strip()]
        why = _one_line(paragraphs[min(1, len(paragraphs) - 1)])
        raise RefusedWeightsError(
            f"model.pretrained={file}: refused: its pickle holds more than tensors and plain values, and "
            f"weights files are read with torch.load(weights_only=True) only ({why})"
        ) from err


def load_pretrained(model: RetrievalModel, path: str | Path) -> None:
    """Load backbone (and, when the file has them, head) weights; any mismatch is an error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file: {file}")
    try:
        incompatible, state = _load_backbone(model.backbone.clip, file)
    except RefusedWeightsError:
        raise
    except Exception as err:  # whatever reading a foreign file raises, name the file
        raise ValueError(f"model.pretrained={file}: cannot load into this preset: {_one_line(err)}") from err
    # Buffers such as the causal mask are computed, not learned; TorchScript files carry them anyway.
    computed = dict(model.backbone.clip.named_buffers())
    unexpected = [
        key for key in incompatible.unexpected_keys if not key.startswith(HEAD_PREFIX) and key not in computed
    ]
    if incompatible.missing_keys or unexpected:
        raise ValueError(
            f"model.pretrained={file}: not a checkpoint of this preset "
            f"(missing: {_short(incompatible.missing_keys) or 'none'}; unexpected: {_short(unexpected) or 'none'})"
        )
    model.head.init_from_clip(model.backbone.clip)  # e.g. EERCF's temporal blocks from CLIP's text blocks
    head_keys = [key for key in incompatible.unexpected_keys if key.startswith(HEAD_PREFIX)]
    if head_keys:  # a file with trained head weights overrides that seed
        state = state if state is not None else load_state_dict(str(file), weights_only=True)
        try:
            model.head.load_state_dict({key[len(HEAD_PREFIX) :]: state[key] for key in head_keys})
        except RuntimeError as err:
            raise ValueError(
                f"model.pretrained={file}: head weights do not fit model.head: {_one_line(err)}"
            ) from err


def save_weights(model: RetrievalModel, path: str | Path) -> Path:
    """Write backbone and head weights to a .safetensors file, atomically and durably (`hvd.runtime.durable`)."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ValueError(
            f"model weights are written as safetensors; the file name must end in .safetensors: {file}"
        )
    tensors = {key: value for key, value in model.backbone.clip.state_dict().items()}
    tensors.update({HEAD_PREFIX + key: value for key, value in model.head.state_dict().items()})
    with atomic_file(file, suffix=".partial") as partial:
        save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(partial))
    return file
