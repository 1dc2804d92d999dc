"""The library's log records read as plain lines on the stdout of the moment, set up once however often asked."""

from __future__ import annotations

import io
import logging
import sys

from hvd.runtime.logs import LOGGER, CurrentStdout, show_logs


def test_progress_is_a_plain_line_and_a_warning_says_so(capsys):
    show_logs()
    logging.getLogger("hvd.data.prepare").info("input 11 = written 4 + quarantined 7")
    logging.getLogger("hvd.train.loop").warning("step 3: not finite, step skipped")
    logging.getLogger("hvd.train.loop").debug("not shown")
    captured = capsys.readouterr()
    assert captured.out == "input 11 = written 4 + quarantined 7\nwarning: step 3: not finite, step skipped\n"
    assert captured.err == ""  # not a second time through a root handler


def test_one_handler_however_often_it_is_set_up_and_it_follows_stdout(monkeypatch):
    show_logs()
    show_logs()
    assert sum(isinstance(h, CurrentStdout) for h in logging.getLogger(LOGGER).handlers) == 1
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stdout", replaced)  # as pytest, or a Ray worker's log redirection, does
    logging.getLogger("hvd.eval.job").info("gallery: 40 videos")
    assert replaced.getvalue() == "gallery: 40 videos\n"
