"""`hvd index` as a script, for `python pipelines/index.py` and `ray job submit -- python pipelines/index.py`."""

from hvd.cli import run_pipeline
from hvd.commands.index import main

if __name__ == "__main__":
    run_pipeline(main)
