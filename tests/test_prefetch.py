"""DevicePrefetcher: order, resumable position, errors, placement off the training thread."""
from __future__ import annotations

import threading

import pytest

from kdface.training._prefetch import DevicePrefetcher


class Counter:
    """A resumable iterator of {'i': k}; ``fail_at`` raises there."""

    def __init__(self, stop=None, fail_at=None):
        self.k, self.stop, self.fail_at = 0, stop, fail_at

    def __next__(self):
        if self.stop is not None and self.k >= self.stop:
            raise StopIteration
        if self.k == self.fail_at:
            raise OSError(f"record {self.k} unreadable")
        self.k += 1
        return {"i": self.k - 1}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]


def test_order_and_position_of_the_last_batch_handed_out():
    threads = []

    def place(batch):
        threads.append(threading.current_thread().name)
        return {"placed": batch["i"]}

    it = DevicePrefetcher(Counter(), place, depth=3)
    got = [next(it)["placed"] for _ in range(4)]
    assert got == [0, 1, 2, 3]
    assert it.get_state() == {"k": 4}  # not the prefetched position (up to 4 + 3)
    assert set(threads) == {"kdface-prefetch"}
    it.set_state({"k": 1})
    assert next(it)["placed"] == 1 and it.get_state() == {"k": 2}
    it.close()


def test_resume_from_recorded_state_replays_the_same_batches():
    first = DevicePrefetcher(Counter(), lambda b: b, depth=2)
    seen = [next(first)["i"] for _ in range(5)]
    state = first.get_state()
    later = [next(first)["i"] for _ in range(3)]
    first.close()
    resumed = DevicePrefetcher(Counter(), lambda b: b, depth=2)
    resumed.set_state(state)
    assert [next(resumed)["i"] for _ in range(3)] == later
    assert seen == [0, 1, 2, 3, 4]
    resumed.close()


def test_errors_reach_the_training_thread_at_their_batch():
    it = DevicePrefetcher(Counter(fail_at=2), lambda b: b, depth=4)
    assert [next(it)["i"] for _ in range(2)] == [0, 1]
    with pytest.raises(OSError, match="record 2"):
        next(it)


def test_end_of_data_and_bad_depth():
    it = DevicePrefetcher(Counter(stop=2), lambda b: b)
    assert [b["i"] for b in it] == [0, 1]
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher(Counter(), lambda b: b, depth=0)
