"""Files and folders that survive a power loss once they are published.

A rename publishes a file, but without `fsync` the kernel may write the rename to disk before the
file's data: after a power loss the new name then holds an empty or partial file, and the readers that
trust "whole or absent" (resume markers, cached shards, checkpoints) read garbage. Every publishing
rename here fsyncs what it publishes first and the folder that holds the new name afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder`, and `folder` itself."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(parent, name))
        fsync_path(parent)


def publish(source: str | Path, target: str | Path) -> None:
    """Rename the finished file or folder `source` to `target` (replacing a file there), durably."""
    if Path(source).is_dir():
        fsync_tree(source)
    else:
        fsync_path(source)
    os.replace(source, target)
    fsync_path(Path(target).parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling to write `path`'s contents into; published durably when the block succeeds,
    removed when it fails, so `path` is always whole or absent (a killed writer leaves only the `suffix` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + suffix)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    publish(partial, path)


def write_text(path: str | Path, text: str) -> Path:
    """`path` holding `text`, whole or absent, durably."""
    with atomic_file(path) as partial:
        partial.write_text(text)
    return Path(path)
