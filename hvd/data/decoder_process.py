"""Decode videos in a child process, so a decoder that crashes or hangs on one file costs that file only.

decord and FFmpeg are native code: a pathological file can segfault the process that decodes it or loop
forever, and in a Ray task that kills or stalls the task and, after Ray's retries, the job. Here each
video is decoded by a long-lived child (`python -m hvd.data.decoder_process`) that the task talks to
over pipes; a child that dies is reported as `decoder_crash`, one that runs past the time limit is
killed and reported as `timeout`, and the next video gets a fresh child. The child keeps one call queued
ahead, so it never idles waiting for the task between videos.

The child's address space is capped (`RLIMIT_AS`, `data.decode_memory_mb`) once its imports are done: a file
that makes the decoder allocate without bound fails that allocation instead of taking the node's memory. A
`MemoryError` is reported as `out_of_memory` and the child goes on; native code that dies of a failed
allocation is a `decoder_crash`.

Messages on the pipes are 8-byte lengths followed by pickles. The decode function travels once, by
value (cloudpickle), so a test or a user can hand in their own.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cloudpickle

from hvd.errors import HvdError

_LENGTH = struct.Struct("<Q")
_READY = "ready"
_START_TIMEOUT_S = 120.0
_QUEUED = 2  # calls in the child's hands at once: the one it decodes and the next


@dataclass
class DecodeFailure:
    """A video that gave no frames: the quarantine's `reason` and `error`."""

    reason: str
    error: str


class DecoderStartError(HvdError, RuntimeError):
    """The child process could not start: a broken install or a memory limit below its imports, not a broken
    video, so the job stops."""


def _write(stream: BinaryIO, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    """`size` bytes from `fd`; None when the deadline passes first. EOFError when the writer is gone."""
    chunks, left = [], size
    while left:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], timeout)[0]:
            return None
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None) -> tuple[bool, Any]:
    """(True, message), or (False, None) when the deadline passed; EOFError when the child is gone."""
    header = _read_exactly(fd, _LENGTH.size, deadline)
    if header is None:
        return False, None
    payload = _read_exactly(fd, _LENGTH.unpack(header)[0], deadline)
    if payload is None:
        return False, None
    return True, pickle.loads(payload)


class DecoderProcess:
    """`decode(path, *args)` run by `fn` in a child process, at most `timeout_s` per call; the child's address
    space is limited to `memory_mb` (None: no limit)."""

    def __init__(self, fn: Callable[..., Any], timeout_s: float, memory_mb: int | None = None):
        self.fn_bytes = cloudpickle.dumps(fn)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        # OpenBLAS reserves memory per core at import; decoding uses none of it, and under an address-space
        # limit that reservation would grow with the node's core count.
        path = os.pathsep.join(p for p in sys.path if p)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": path}
        child = subprocess.Popen(
            [sys.executable, "-m", "hvd.data.decoder_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        _write(child.stdin, (self.fn_bytes, self.memory_mb))
        try:
            ready, message = _read(child.stdout.fileno(), time.monotonic() + _START_TIMEOUT_S)
        except EOFError:
            ready, message = False, None
        if not ready or message != _READY:
            self._stop(child)
            why = message if isinstance(message, str) else f"exit code {child.returncode}; stderr above"
            raise DecoderStartError(f"the decoder process did not start ({why})")
        return child

    def decode(self, path: str | Path, *args: Any) -> Any:
        """The decode function's result, or a `DecodeFailure` for a crash, a timeout or a raised error."""
        return next(self.map([(path, args)]))

    def map(self, calls: Iterable[tuple[str | Path, tuple]]) -> Iterator[Any]:
        """`decode(path, *args)` for each call, in order. The next call waits queued in the child's input,
        so the child goes from one video to the next without waiting for this process to answer."""
        calls, sent = iter(calls), deque()
        started = time.monotonic()  # when the child began the oldest call in `sent`
        try:
            while True:
                if self.child is None:
                    self.child = self._start()
                    self._send(sent)  # what a dead child had queued
                    started = time.monotonic()
                while len(sent) < _QUEUED and (call := next(calls, None)) is not None:
                    if not sent:
                        started = time.monotonic()
                    sent.append((str(call[0]), tuple(call[1])))
                    self._send([sent[-1]])
                if not sent:
                    return
                yield self._reply(sent.popleft()[0], started)
                started = time.monotonic()
        finally:
            if sent:  # stopped early: the child's queued replies must not reach the next caller
                self.close()

    def _send(self, calls: Iterable[tuple[str, tuple]]) -> None:
        try:
            for call in calls:
                _write(self.child.stdin, call)
        except BrokenPipeError:  # the child died; reading its reply says so
            pass

    def _reply(self, path: str, started: float) -> Any:
        child = self.child
        try:
            done, reply = _read(child.stdout.fileno(), started + self.timeout_s)
        except EOFError:
            self.child = None
            code = child.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            error = f"{path}: the decoder process died ({how}) while decoding it"
            if self.memory_mb is not None:
                error += f"; native code past data.decode_memory_mb={self.memory_mb} can die so"
            return DecodeFailure("decoder_crash", error)
        if not done:
            self.close()
            return DecodeFailure(
                "timeout", f"{path}: decoding took longer than data.decode_timeout_s={self.timeout_s:g} s; stopped"
            )
        status, value = reply
        return value if status == "ok" else DecodeFailure(*value)

    @staticmethod
    def _stop(child: subprocess.Popen) -> None:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            stream.close()

    def close(self) -> None:
        if self.child is not None:
            self._stop(self.child)
            self.child = None


def _virtual_mb() -> float:
    """This process's address space now (VmSize), what RLIMIT_AS bounds."""
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) / 1024


def _limit_memory(memory_mb: int) -> str | None:
    """Cap the address space at `memory_mb`; why not, when the imports alone already take that much."""
    used = _virtual_mb()
    if used >= memory_mb:
        return f"data.decode_memory_mb={memory_mb} is below the {used:.0f} MB the decoder holds after imports"
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return None


def _serve() -> None:
    """The child's loop: decode each path it is sent until its input closes."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the decoders print goes to stderr, never into the replies
    requests = sys.stdin.buffer
    fn_bytes, memory_mb = _read(requests.fileno())[1]
    fn = cloudpickle.loads(fn_bytes)  # imports the decoder's modules, before the limit
    refusal = None if memory_mb is None else _limit_memory(memory_mb)
    _write(replies, refusal or _READY)
    if refusal:
        return
    while True:
        try:
            _, (path, args) = _read(requests.fileno())
        except EOFError:
            return
        try:
            _write(replies, ("ok", fn(path, *args)))
        except MemoryError as err:  # past the address-space limit: this video needs more than the others
            detail = f"needs more than data.decode_memory_mb={memory_mb} allows ({type(err).__name__}: {err})"
            _write(replies, ("error", ("out_of_memory", f"{path}: {detail}")))
        except Exception as err:  # any failure of one video is that video's; the child goes on
            _write(replies, ("error", (getattr(err, "reason", type(err).__name__), str(err))))


if __name__ == "__main__":
    _serve()
