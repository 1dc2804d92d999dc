"""What every Ray worker of ours sets up, and what a training or encoding process must never load."""

import logging
import subprocess
import sys

from hvd.runtime.worker_setup import OncePer


def test_once_per_lets_the_first_record_through_then_one_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("hvd.runtime.worker_setup.time.monotonic", lambda: clock[0])
    limit = OncePer(60.0)

    def record() -> logging.LogRecord:
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, "state API unavailable", None, None)

    assert limit.filter(record())
    assert not any(limit.filter(record()) for _ in range(5))
    clock[0] += 61
    passed = record()
    assert limit.filter(passed) and passed.getMessage() == "state API unavailable (5 more like this in the last 60 s)"


def test_training_and_encoding_processes_load_no_video_decoder():
    """decord loads its FFmpeg 4.1 and zlib 1.2.3 builds with RTLD_GLOBAL: every library loaded after it in the
    process binds its zlib calls to them (LD_DEBUG=bindings shows Pillow's libpng and freetype, torchvision's
    libpng and libz doing so), and decord before CUDA crashes torch. Only prepare's decode tasks may load it."""
    code = (
        "import sys, hvd.train.loop, hvd.train.inputs, hvd.eval.actors\n"
        "import hvd.data.shards, hvd.model\n"
        "print(sorted(m for m in ('decord', 'av') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert loaded.stdout.strip() == "[]"


def test_failure_summary_names_each_worker_and_calls_a_peer_disconnect_a_symptom():
    from types import SimpleNamespace

    from hvd.train.trainer import failure_summary

    gloo = RuntimeError("Traceback ...\n[pair.cc:561] Connection closed by peer [127.0.0.1]:12989. This is typically ...")
    err = SimpleNamespace(worker_failures={1: ValueError("bad frame\nshape mismatch"), 0: gloo})
    summary = failure_summary(err)
    assert summary.startswith("worker 0: RuntimeError: its peer's connection closed: a symptom")
    assert summary.endswith("worker 1: ValueError: shape mismatch")
