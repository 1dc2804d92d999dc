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
    reader = endless._readers[0][0]
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_two_sources_start_the_next_epoch_before_this_one_is_read_and_never_share_a_source():
    """Epochs take turns over two sources: epoch e + 1 starts after `start_next_after` batches of epoch e (the
    loop still training on e), and epoch e + 2, on e's source, not before e's reading is done."""
    started, finished, events = {}, set(), []

    def one_epoch(epoch: int):
        started[epoch] = True
        events.append(("start", epoch))
        assert epoch - 2 not in started or epoch - 2 in finished  # a source serves one epoch at a time
        for i in range(6):
            yield f"e{epoch}b{i}"
        finished.add(epoch)
        events.append(("end", epoch))

    stream = EpochStream(one_epoch, first=0, last=3, sources=2, start_next_after=2)
    batches = stream.epoch(0)
    assert [next(batches) for _ in range(3)] == ["e0b0", "e0b1", "e0b2"]
    for _ in range(100):  # the reader is a batch ahead: it has read 4 of epoch 0's 6
        if 1 in started:
            break
        threading.Event().wait(0.05)
    assert 1 in started and 0 not in finished and 2 not in started
    assert [*batches] == [f"e0b{i}" for i in range(3, 6)]
    for epoch in (1, 2, 3):
        assert list(stream.epoch(epoch)) == [f"e{epoch}b{i}" for i in range(6)]
    assert events.index(("end", 0)) < events.index(("start", 2)) and events.index(("end", 1)) < events.index(("start", 3))


def test_one_source_starts_the_next_epoch_only_when_this_one_is_read():
    started = []

    def one_epoch(epoch: int):
        started.append(epoch)
        yield from range(5)

    stream = EpochStream(one_epoch, first=0, last=1, sources=1, start_next_after=1)  # ignored: one source
    batches = stream.epoch(0)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    threading.Event().wait(0.2)
    assert started == [0]
    assert [*batches] == [3, 4] and list(stream.epoch(1)) == [0, 1, 2, 3, 4] and started == [0, 1]
