"""`hvd study` as a script, for `python pipelines/study.py` and `ray job submit -- python pipelines/study.py`."""

from hvd.cli import run_pipeline
from hvd.commands.study import main

if __name__ == "__main__":
    run_pipeline(main)
