"""Turn a public benchmark's annotation files (or your own folder of videos) into the common manifest.

python pipelines/manifest.py msrvtt --annotations DIR --videos DIR --out FILE.jsonl [--option train_split=7k]
"""

from __future__ import annotations

import argparse

from hvd.cli import fail
from hvd.data.importers import IMPORTERS, BenchmarkError, describe_importers, import_benchmark


def parse_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option '{text}' is not of the form key=value")
    return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=describe_importers(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "benchmark", choices=list(IMPORTERS), metavar="NAME", help="benchmark format (listed below)"
    )
    parser.add_argument(
        "--annotations", required=True, help="folder holding the benchmark's annotation files"
    )
    parser.add_argument("--videos", required=True, help="folder holding the video files")
    parser.add_argument(
        "--out", required=True, help="manifest to write (.jsonl); video paths are relative to it"
    )
    parser.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="importer option",
    )
    parser.add_argument(
        "--drop-missing", action="store_true", help="leave videos missing on disk out of the manifest"
    )
    args = parser.parse_args(argv)
    try:
        report = import_benchmark(
            args.benchmark, args.annotations, args.videos, args.out, dict(args.option), args.drop_missing
        )
    except BenchmarkError as err:
        fail(err)
    print(report.summary())

