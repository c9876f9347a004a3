"""Training throughput that counts training alone: not the first (compiling) step, not
evaluation, not checkpoint writes.

The train loop calls ``step_done()`` after each step, wraps evaluation and saving in
``with meter.paused():`` and reads ``images_per_s()`` at log steps. The clock starts after the
first step (its time is compilation), and a pause stops it. Steps are dispatched
asynchronously, so between log steps the clock measures dispatch; the figure is exact over any
interval that ends where the host waited for the device (a log step fetching metrics,
evaluation), which is where it is read.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


class ThroughputMeter:
    """Images per second of training steps only.

    batch_size: images per step (the global batch). announce: print a line before the first
    step, whose compilation can take minutes without a sign otherwise. clock: a seconds
    counter (``time.perf_counter``; tests pass a fake one).
    """

    def __init__(self, batch_size: int, *, announce: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.batch_size = int(batch_size)
        self._clock = clock
        self._elapsed = 0.0
        self._since: float | None = None  # running since; None while paused or not started
        self._started = False
        self.images = 0
        if announce:
            print("kdface.train: compiling the train step (first step)...", file=sys.stderr,
                  flush=True)

    def step_done(self) -> None:
        """After a step: the first one starts the clock, later ones count their images."""
        if not self._started:
            self._started = True
            self._since = self._clock()
            return
        self.images += self.batch_size

    def pause(self) -> None:
        if self._since is not None:
            self._elapsed += self._clock() - self._since
            self._since = None

    def resume(self) -> None:
        if self._started and self._since is None:
            self._since = self._clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation or checkpointing inside: its time is not training time."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def seconds(self) -> float:
        """Training seconds measured so far (after the first step, pauses excluded)."""
        running = self._clock() - self._since if self._since is not None else 0.0
        return self._elapsed + running

    def images_per_s(self) -> float | None:
        """Images per training second, or None before two steps have run."""
        seconds = self.seconds()
        return self.images / seconds if self.images and seconds > 0 else None
