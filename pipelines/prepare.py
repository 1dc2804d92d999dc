"""`hvd prepare` as a script, for `python pipelines/prepare.py` and `ray job submit -- python pipelines/prepare.py`."""

from hvd.cli import run_pipeline
from hvd.commands.prepare import main

if __name__ == "__main__":
    run_pipeline(main)
