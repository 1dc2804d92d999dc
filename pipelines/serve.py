"""`hvd serve` as a script, for `python pipelines/serve.py` and `ray job submit -- python pipelines/serve.py`."""

from hvd.cli import run_pipeline
from hvd.commands.serve import main

if __name__ == "__main__":
    run_pipeline(main)
