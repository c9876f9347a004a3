"""Run logs: a JSONL file, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar.

``log.jsonl`` holds every logged record for scripts; the event file holds the numeric values
as TensorBoard scalars (tag ``<kind>/<name>``), plus the run's configuration as TensorBoard
hparams and as a text table when one is given; the bar is :func:`kdface._progress.progress`.
"""
from __future__ import annotations

import json
import numbers
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import hparams as hparams_summaries

from kdface._progress import progress

# The tags the hparams dashboard shows next to each run's configuration: what the trainer logs
# at every log step and at every validation.
HPARAM_METRICS = ("train/loss", "val/val_accuracy")


class RunLog:
    """JSONL + TensorBoard events + a progress bar; does nothing when ``enabled`` is False.

    directory: where ``log.jsonl`` and ``events.out.tfevents.*`` go (appended to on resume).
    total_steps: where the progress bar ends. hparams: the run's configuration ({flag: value});
    values other than bool/int/float/str are recorded as their JSON text.
    """

    def __init__(self, directory: str, *, enabled: bool = True, total_steps: int = 0,
                 hparams: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self._bar = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, "log.jsonl"), "a")
        self._writer = SummaryWriter(logdir=directory)
        if hparams:
            flat = {k: _hparam_value(v) for k, v in hparams.items()}
            for summary in hparams_summaries(flat, {tag: 0.0 for tag in HPARAM_METRICS}):
                self._writer.file_writer.add_summary(summary)
            table = "\n".join(["| flag | value |", "|---|---|"]
                              + [f"| {k} | `{v}` |" for k, v in flat.items()])
            self._writer.add_text("config", table, 0)
            self._writer.flush()

    def log(self, step: int, values: Mapping[str, Any], *, kind: str = "train") -> None:
        """Appends ``{step, kind, time, **values}`` to the JSONL and the numbers as scalars.

        Real numbers (Python or NumPy) become scalars ``<kind>/<name>``; other values (text,
        lists) go to the JSONL only.
        """
        if not self.enabled:
            return
        now = time.time()
        self._jsonl.write(json.dumps({"step": step, "kind": kind, "time": now, **values},
                                     default=_plain) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, numbers.Real):
                self._writer.add_scalar(f"{kind}/{name}", float(value), step, walltime=now)
        # Log steps are rare: flushing each one lets TensorBoard show the run as it goes.
        self._writer.flush()

    def progress(self, step: int, values: Mapping[str, float]) -> None:
        """Moves the bar to ``step`` and shows ``values`` beside it."""
        if not self.enabled:
            return
        if self._bar is None:
            # Created at the first report so that a resumed run's rate counts from its restart.
            self._bar = progress(total=self.total_steps, desc="train", unit="step",
                                 initial=step)
        else:
            self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._writer.close()


def read_events(path: str) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in a TensorBoard event file, checking both CRCs.

    For scripts and tests without TensorBoard: the TFRecord framing (length, masked CRC32C of
    the length, record, masked CRC32C of the record) read with tensorboardX's own checksum and
    ``Event`` message.
    """
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        record = data[pos + 12:pos + 12 + length]
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if header_crc != masked_crc32c(header) or record_crc != masked_crc32c(record):
            raise ValueError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos += 16 + length
        event = Event.FromString(record)
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.append((event.step, value.tag, value.simple_value))
    return out


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def _plain(value: Any) -> Any:
    """NumPy / JAX scalars as Python numbers in the JSONL; anything else as its text."""
    return value.item() if getattr(value, "shape", None) == () else str(value)
