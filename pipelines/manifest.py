"""`hvd manifest` as a script, for `python pipelines/manifest.py` and `ray job submit -- python pipelines/manifest.py`."""

from hvd.cli import run_pipeline
from hvd.commands.manifest import main

if __name__ == "__main__":
    run_pipeline(main)
