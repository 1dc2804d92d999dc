"""`hvd synthetic` as a script, for `python pipelines/synthetic.py` and `ray job submit -- python pipelines/synthetic.py`."""

from hvd.cli import run_pipeline
from hvd.commands.synthetic import main

if __name__ == "__main__":
    run_pipeline(main)
