"""The training input read ahead across epoch ends (`hvd.train.inputs.EpochStream`)."""

import threading

import pytest

from hvd.train.inputs import EpochStream


def test_the_next_epoch_starts_reading_while_the_loop_is_still_in_the_last():
    started = {}  # epoch -> set when its iterator was made

    def one_epoch(epoch: int):
        started[epoch] = threading.Event()
        started[epoch].set()
        yield from (f"e{epoch}b{i}" for i in range(3))

    stream = EpochStream(one_epoch, first=1, last=3)
    assert list(stream.epoch(1)) == ["e1b0", "e1b1", "e1b2"]
    # the loop now validates and checkpoints; epoch 2's execution has already started, without being asked for
    for _ in range(100):
        if 2 in started:
            break
        threading.Event().wait(0.05)
    assert 2 in started and 3 not in started  # one epoch ahead, no further (the queue holds one batch)
    assert list(stream.epoch(2)) == ["e2b0", "e2b1", "e2b2"]
    assert list(stream.epoch(3)) == ["e3b0", "e3b1", "e3b2"]
    with pytest.raises(ValueError, match="outside"):
        next(stream.epoch(4))


def test_a_loop_that_stops_early_gets_the_next_epoch_from_its_start():
    stream = EpochStream(lambda epoch: iter(range(10 * epoch, 10 * epoch + 5)), first=0, last=1)
    first = stream.epoch(0)
    assert [next(first), next(first)] == [0, 1]  # the loop breaks after two steps
    assert list(stream.epoch(1)) == [10, 11, 12, 13, 14]


def test_a_failing_read_raises_in_the_loop_and_close_stops_the_thread():
    def one_epoch(epoch: int):
        yield "fine"
        raise OSError(f"shard of epoch {epoch} unreadable")

    stream = EpochStream(one_epoch, first=0, last=2)
    batches = stream.epoch(0)
    assert next(batches) == "fine"
    with pytest.raises(OSError, match="shard of epoch 0 unreadable"):
        next(batches)

    endless = EpochStream(lambda epoch: iter(range(10**9)), first=0, last=0)
    assert next(endless.epoch(0)) == 0
    endless.close()
    endless._thread.join(timeout=5)
    assert not endless._thread.is_alive()
