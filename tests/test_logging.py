"""RunLog: the JSONL records, and event files that TensorBoard's record format reads back.

The event file is read here with an independent TFRecord reader (a bitwise CRC32C straight from
its definition, RFC 3720 §B.4, and the TFRecord masking) and the ``Event`` protocol buffer
classes that tensorboardX ships, so a wrong checksum, step, tag or value fails the test.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

from kdface import _progress
from kdface.training import RunLog, read_events


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(directory) -> list[Event]:
    names = [f for f in os.listdir(directory) if f.startswith("events.out.tfevents.")]
    assert len(names) == 1, names
    data = open(os.path.join(directory, names[0]), "rb").read()
    events, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked(data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == \
            _masked(record)
        events.append(Event.FromString(record))
        pos += 16 + length
    return events


def test_run_log_writes_jsonl_and_tensorboard_scalars(tmp_path):
    log = RunLog(str(tmp_path), total_steps=20)
    log.log(10, {"loss": 2.5, "lr": np.float32(0.1), "note": "warmup"})
    log.log(20, {"loss": 1.25, "images_per_s": 300})
    log.log(20, {"val_accuracy": 0.875}, kind="val")
    log.progress(20, {"loss": 1.25})
    log.close()

    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(r["step"], r["kind"]) for r in records] == [(10, "train"), (20, "train"),
                                                        (20, "val")]
    assert records[0]["note"] == "warmup" and records[1]["loss"] == 1.25

    events = _events(tmp_path)
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    # strings are JSONL-only; TensorBoard stores float32, so 0.1 comes back exactly as float32(0.1)
    assert scalars == [(10, "train/loss", 2.5), (10, "train/lr", float(np.float32(0.1))),
                       (20, "train/loss", 1.25), (20, "train/images_per_s", 300.0),
                       (20, "val/val_accuracy", 0.875)]
    assert read_events(str(next(tmp_path.glob("events.out.tfevents.*")))) == scalars


def test_run_log_records_the_config_as_hparams_and_text(tmp_path):
    config = {"recipe": "kd_im", "learning_rate": 0.1, "bf16": False, "steps": 300,
              "decay_steps": (100, 200), "student_options": {"width": 8}}
    log = RunLog(str(tmp_path), hparams=config)
    log.close()
    values = [v for e in _events(tmp_path) for v in e.summary.value]
    session = [HParamsPluginData.FromString(v.metadata.plugin_data.content)
               for v in values if v.metadata.plugin_data.plugin_name == "hparams"]
    start = next(s.session_start_info for s in session if s.HasField("session_start_info"))
    got = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert got == {"recipe": "kd_im", "learning_rate": 0.1, "bf16": False, "steps": 300.0,
                   "decay_steps": "[100, 200]", "student_options": '{"width": 8}'}
    experiment = next(s.experiment for s in session if s.HasField("experiment"))
    assert [m.name.tag for m in experiment.metric_infos] == ["train/loss", "val/val_accuracy"]
    text = [v for v in values if v.tag.startswith("config")]
    assert len(text) == 1
    table = text[0].tensor.string_val[0].decode()
    assert "| recipe | `kd_im` |" in table and "| steps | `300` |" in table


def test_disabled_run_log_writes_nothing(tmp_path):
    log = RunLog(str(tmp_path / "logs"), enabled=False, total_steps=5)
    log.log(1, {"loss": 1.0})
    log.progress(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "logs").exists()


def test_read_events_rejects_a_corrupt_record(tmp_path):
    log = RunLog(str(tmp_path))
    log.log(1, {"loss": 1.0})
    log.close()
    path = next(tmp_path.glob("events.out.tfevents.*"))
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_events(str(path))


def test_progress_bar_shown_only_when_watched(monkeypatch, capsys):
    monkeypatch.delenv("KDFACE_PROGRESS", raising=False)
    # pytest's captured stderr is not a terminal: the bar stays silent but still counts
    bar = _progress.progress(range(7), total=7, desc="embed")
    assert sum(1 for _ in bar) == 7 and bar.disable
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("KDFACE_PROGRESS", "1")
    with _progress.progress(total=4, desc="build", unit="img") as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "build" in err and "4/4" in err
    with _progress.progress(total=4, desc="quiet", enabled=False) as bar:
        bar.update(4)
    monkeypatch.setenv("KDFACE_PROGRESS", "0")
    with _progress.progress(total=4, desc="hidden") as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""


def test_run_log_progress_bar_follows_the_logged_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDFACE_PROGRESS", "1")
    log = RunLog(str(tmp_path), total_steps=30)
    log.progress(10, {"loss": 2.0})  # a resumed run may start anywhere
    log.progress(30, {"loss": 0.123456})
    assert log._bar.n == 30
    log.close()
    err = capsys.readouterr().err
    assert "30/30" in err and "loss=0.1235" in err
