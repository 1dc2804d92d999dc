"""Warm-start a CLIP preset on captioned stills of the synthetic world, as real users start from CLIP's weights.

    python pipelines/pretrain.py [--config configs/NAME.yaml] [key=value ...]

Trains `model.preset`'s image-text CLIP with Ray Train on `pretrain.train_stills` stills, registers it in
MLflow as clip-<preset>-synthetic and writes an open_clip checkpoint under `pretrain.out`, named by the
fingerprint of its settings. `pipelines/train.py` does the same first when `model.pretrained=synthetic`
(the default) and reuses the file when it exists; run this to make it ahead, or to see it alone.
"""

from __future__ import annotations

from hvd.cli import fail, parse_args
from hvd.errors import HvdError

SECTIONS = ("run", "synthetic", "data", "model", "pretrain", "train", "tracking")


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(__doc__, SECTIONS, argv)
    # the job's imports (torch, Ray, MLflow) only once the arguments are good: see hvd.cli
    from hvd.train.warm_start import pretrain

    try:
        weights = pretrain(cfg)
    except HvdError as err:  # each says what went wrong and what to do
        fail(err)
    print(f"\nload it with    model.pretrained={weights}")

