"""Batches placed on the device mesh ahead of the step that consumes them.

The host decodes and assembles batch k+1 (and starts its transfer) while the device runs step k.
A background thread does the host part (decode, teacher-cache rows, ``device_put``) and keeps up
to ``depth`` placed batches ready; the training thread only dispatches steps. ``device_put`` /
``make_array_from_process_local_data`` return as soon as the copy is enqueued, so the transfer
itself also overlaps the running step.

The iterator's resumable position is the position *after the last batch handed to the loop*, not
after the last one prefetched: ``get_state()`` returns the state recorded with each batch when it
was drawn, so a checkpoint written after step k resumes at batch k+1 even though k+2 .. k+depth
were already read.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_END = object()


class DevicePrefetcher:
    """Wraps a resumable host iterator (``__next__``, ``get_state``, ``set_state``).

    ``place(batch) -> device batch`` runs in the background thread. ``depth`` >= 1 batches are
    kept ready. Exceptions raised by the host iterator or ``place`` are re-raised in the training
    thread at the batch where they happened.
    """

    def __init__(self, batches, place: Callable[[dict[str, Any]], dict[str, Any]], *,
                 depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.batches = batches
        self.place = place
        self.depth = depth
        self._state = batches.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop),
                                        daemon=True, name="kdface-prefetch")
        self._thread.start()

    def _fill(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                host = next(self.batches)
                item = (self.place(host), self.batches.get_state(), None)
            except StopIteration:
                item = (_END, None, None)
            except BaseException as e:  # handed to the training thread, not lost here
                item = (None, None, e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is _END or item[2] is not None:
                return

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if batch is _END:
            self.close()
            raise StopIteration
        self._state = state
        return batch

    def get_state(self) -> dict[str, Any]:
        """The host iterator's position after the last batch returned by ``__next__``."""
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.batches.set_state(state)
        self._state = state

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None
