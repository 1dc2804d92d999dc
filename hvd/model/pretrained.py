"""Model weights in and out of files, through open_clip's own checkpoint loading.

A file we write is an open_clip state dict (so open_clip can read its backbone as it is) plus the
head's weights under `head.`; it loads back through `model.pretrained=PATH` like any CLIP checkpoint
(an open_clip training checkpoint, an OpenAI TorchScript file, a safetensors file), which then leaves
the head as initialised.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import open_clip
from open_clip.factory import load_state_dict
from safetensors.torch import save_file

from hvd.model.model import RetrievalModel

HEAD_PREFIX = "head."


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP files are TorchScript archives, which torch.load reads only with weights_only=False."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_pretrained(model: RetrievalModel, path: str | Path) -> None:
    """Load backbone (and, when the file has them, head) weights; any mismatch is an error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file: {file}")
    try:
        incompatible = open_clip.load_checkpoint(
            model.backbone.clip, str(file), strict=False, weights_only=not _is_torchscript_archive(file)
        )
    except Exception as err:  # whatever reading a foreign file raises, name the file
        reason = " ".join(str(err).split())
        raise ValueError(f"model.pretrained={file}: cannot load into this preset: {reason}") from err
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
        state = load_state_dict(str(file))
        try:
            model.head.load_state_dict({key[len(HEAD_PREFIX) :]: state[key] for key in head_keys})
        except RuntimeError as err:
            reason = " ".join(str(err).split())
            raise ValueError(
                f"model.pretrained={file}: head weights do not fit model.head: {reason}"
            ) from err


def save_weights(model: RetrievalModel, path: str | Path) -> Path:
    """Write backbone and head weights to a .safetensors file, atomically."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ValueError(
            f"model weights are written as safetensors; the file name must end in .safetensors: {file}"
        )
    tensors = {key: value for key, value in model.backbone.clip.state_dict().items()}
    tensors.update({HEAD_PREFIX + key: value for key, value in model.head.state_dict().items()})
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(partial))
    os.replace(partial, file)
    return file
