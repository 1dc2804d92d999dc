"""Output folders that one process writes at a time and that appear whole or not at all.

Two jobs preparing the same benchmark into one folder (two evaluations sharing `eval.cache` do) would
otherwise interleave their files and leave a folder with every video twice. A writer holds an exclusive
lock on a sibling lock file for the whole check-decode-write, builds the folder under a hidden sibling
name and renames it into place when it is complete: a reader sees the old folder or the new one, and a
killed writer leaves only the staging folder, which the next writer removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from hvd.runtime.durable import fsync_path, write_text
from hvd.runtime.durable import publish as publish_durably

logger = logging.getLogger(__name__)

STAGING_IDENTITY = "_identity.json"  # in a resumable staging folder: what its contents were made for


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.parent / f".{folder.name}.{suffix}"


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message says which (pid, host, since when)."""


def _sign(file: TextIO) -> None:
    """Write who holds the lock into its file, for whoever finds it held."""
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    file.flush()


def _holder(file: TextIO) -> str:
    file.seek(0)
    return file.read().strip() or "another process"


def hold(lock: Path) -> TextIO:
    """The exclusive lock on file `lock`, taken now or refused with `LockHeld`: held until the returned file
    is closed or this process dies (the kernel releases `flock` locks of dead processes)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    file = open(lock, "a+")  # noqa: SIM115 - the open file is the lock, closed by the caller
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(file)
        file.close()
        raise LockHeld(holder) from None
    _sign(file)
    return file


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "writer") -> Iterator[None]:
    """Hold the lock of `folder` for a block; a second writer waits, saying once whom it waits for.

    `flock` locks are released by the kernel when their holder dies, so a killed writer never leaves
    the folder locked.
    """
    lock = _sibling(folder, "lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"{folder}: waiting for the {what} that holds it ({_holder(file)}) to finish")
            fcntl.flock(file, fcntl.LOCK_EX)
        _sign(file)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def fresh_staging(folder: Path) -> Path:
    """An empty hidden sibling to build `folder` in; call while holding `exclusive(folder)`, which makes
    any staging folder already there a dead writer's leftover."""
    staging = _sibling(folder, "partial")
    if staging.exists():
        logger.info(f"{folder}: removing what an interrupted run left in {staging.name}; "
                    "starting from the beginning")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def resumable_staging(folder: Path, identity: dict[str, Any], resume: bool = True) -> tuple[Path, bool]:
    """A hidden sibling to build `folder` in, and whether it resumes an interrupted run: one made for the
    same `identity` is kept as it is unless `resume` is false, any other leftover removed. Call while
    holding `exclusive(folder)`."""
    staging = _sibling(folder, "partial")
    stamp = staging / STAGING_IDENTITY
    same = stamp.is_file() and json.loads(stamp.read_text()) == identity
    if same and resume:
        return staging, True
    if staging.exists():
        why = "overwrite: starting from the beginning" if same else "it had other settings"
        logger.info(f"{folder}: removing what an interrupted run left in {staging.name} ({why})")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    fsync_path(staging.parent)
    write_text(stamp, json.dumps(identity) + "\n")
    return staging, False


def publish(staging: Path, folder: Path) -> None:
    """Put the finished `staging` folder in place of `folder`, replacing whatever `folder` held; every file
    in it reaches the disk before the rename does (`hvd.runtime.durable`)."""
    if folder.exists():
        replaced = _sibling(folder, "replaced")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(folder, replaced)
        publish_durably(staging, folder)
        shutil.rmtree(replaced)
    else:
        publish_durably(staging, folder)


@contextlib.contextmanager
def building(folder: Path, what: str, built: Callable[[Path], bool] | None = None) -> Iterator[Path | None]:
    """Build `folder` once, whole: under its lock, None when `built(folder)` says it already holds what is
    wanted (a concurrent writer may just have made it), else an empty staging folder to fill, published in
    place of `folder` when the block succeeds and removed when it fails (a killed writer's is removed by
    the next writer)."""
    with exclusive(folder, what):
        if built is not None and built(folder):
            yield None
            return
        staging = fresh_staging(folder)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, folder)
