"""`hvd evaluate` as a script, for `python pipelines/evaluate.py` and `ray job submit -- python pipelines/evaluate.py`."""

from hvd.cli import run_pipeline
from hvd.commands.evaluate import main

if __name__ == "__main__":
    run_pipeline(main)
