"""Command-line front for every pipeline: flags, `--config FILE`, `key=value` overrides, `--help`.

Light on purpose: a command imports its job (torch, Ray, MLflow: about 12 s on 2 cores) inside its `main`, after
`parse_args`, so `--help`, `--print-config`, a refused key and a `--model` of no known form answer in about a second.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from hvd.config import Config, ConfigError, describe, load_config, to_yaml
from hvd.errors import HvdError, InputError
from hvd.registry.model_uri import URI_FORMS, check_model_uri
from hvd.runtime.logs import show_logs
from hvd.runtime.paths import resolve_path
from hvd.runtime.stopping import received_signal, stop_on_signals
from hvd.runtime.worker_setup import VERBOSE_ENV


def parse_args(
    description: str,
    sections: tuple[str, ...],
    argv: Sequence[str] | None = None,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
    flag_overrides: Callable[[argparse.Namespace], list[str]] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse a pipeline's command line into the one `Config`; a bad key exits with status 2 before any work.

    `flag_overrides` turns pipeline-specific flags (`--out DIR`) into `key=value` overrides, so the
    flags and the config can never disagree. The library's progress lines show from here on (`hvd.runtime.logs`).
    """
    show_logs()
    parser = argparse.ArgumentParser(
        description=description,
        epilog=describe(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help="YAML file merged over the defaults; repeat it to compose files, a later one over an earlier one",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML) and exit, starting nothing"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Ray's and MLflow's own logs, and Ray Data's progress bars on a terminal"
    )
    if add_flags is not None:
        add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.head=meanp")
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by every process of the job: hvd.runtime.worker_setup
    else:  # a model's files are downloaded in a blink from a local store: no bar per file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    overrides = (flag_overrides(args) if flag_overrides else []) + list(args.overrides)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.print_config:
        print(to_yaml(cfg), end="")
        parser.exit(0)
    if getattr(args, "model", None) is not None:  # its form, before the job's imports (`add_model_flag`)
        try:
            check_model_uri(args.model)
        except HvdError as err:
            fail(err)
    for flag, exists in (("manifest", Path.is_file), ("shards", Path.is_dir)):  # inputs the job would find missing
        value = getattr(args, flag, None)  # after its imports
        path = None if value is None else resolve_path(str(value))  # where the job looks: under HVD_ROOT
        if path is not None and "://" not in path and not exists(Path(path)):
            fail(InputError(f"{flag} not found: {path}"))
    return cfg, args


def run_pipeline(main: Callable[[list[str]], None]) -> None:
    """Run a pipeline's `main` on the command line. An `HvdError` ends it with one line and its exit code (2
    for bad input). SIGTERM and SIGINT raise KeyboardInterrupt, so the MLflow run it opened ends KILLED and its
    locks and Ray are released on the way out; it then exits 128 + the signal's number with one line."""
    show_logs()
    stop_on_signals()
    try:
        main(sys.argv[1:])
    except HvdError as err:
        fail(err)
    except KeyboardInterrupt:
        signum = received_signal() or signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


def fail(error: str | Exception) -> NoReturn:
    """Print `error` as one line and exit: with its `exit_code` for an `HvdError` (2: bad input), else 1."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(error.exit_code if isinstance(error, HvdError) else 1)


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    """`--model URI`, the model a job uses; `parse_args` refuses a URI of no known form at once."""
    parser.add_argument("--model", required=True, metavar="URI", help=URI_FORMS)


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """The model and the benchmark split a job runs on: shared by evaluate.py and index.py."""
    add_model_flag(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest", type=Path, metavar="FILE", help="benchmark manifest (JSONL), prepared and cached"
    )
    source.add_argument("--shards", type=Path, metavar="DIR", help="shards prepared by pipelines/prepare.py")
