"""`hvd pretrain` as a script, for `python pipelines/pretrain.py` and `ray job submit -- python pipelines/pretrain.py`."""

from hvd.cli import run_pipeline
from hvd.commands.pretrain import main

if __name__ == "__main__":
    run_pipeline(main)
