"""`hvd search` as a script, for `python pipelines/search.py` and `ray job submit -- python pipelines/search.py`."""

from hvd.cli import run_pipeline
from hvd.commands.search import main

if __name__ == "__main__":
    run_pipeline(main)
