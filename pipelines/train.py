"""`hvd train` as a script, for `python pipelines/train.py` and `ray job submit -- python pipelines/train.py`."""

from hvd.cli import run_pipeline
from hvd.commands.train import main

if __name__ == "__main__":
    run_pipeline(main)
