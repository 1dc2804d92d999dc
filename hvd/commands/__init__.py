"""HVD text-video retrieval: every pipeline as one command.

`hvd COMMAND --help` lists its flags and config keys; `hvd train ...` runs what
`python pipelines/train.py ...` runs.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

# The order a user meets them in: data, then training, then using a trained model.
COMMANDS = ("synthetic", "manifest", "prepare", "pretrain", "train", "evaluate", "index", "search", "serve", "study")


def summary(name: str) -> str:
    """A command's first docstring line, read from its source: `hvd --help` imports neither Ray nor torch."""
    source = Path(__file__).with_name(f"{name}.py").read_text()
    return (ast.get_docstring(ast.parse(source)) or "").splitlines()[0]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    return "usage: hvd COMMAND [args...]\n\n" + (__doc__ or "") + "\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The installed `hvd` command: run COMMAND's `main` as its pipeline script would."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)  # no command: a usage error
        raise SystemExit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"hvd: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    from hvd.cli import run_pipeline  # imports Ray: after the checks above, so they answer at once

    command = importlib.import_module(f"hvd.commands.{name}")
    sys.argv = [f"hvd {name}", *rest]  # the command's usage and errors name it `hvd NAME`
    run_pipeline(command.main)
