"""Wang, Lan, Zhang 2017 ("Model Distillation with Knowledge Transfer from Face Classification to
Alignment and Verification", arXiv:1709.02929) end to end on kdface's synthetic faces, which come
with 5 landmarks: softmax pretraining (eq. 3) -> classification distillation with full
initialization (eq. 4) -> alignment teacher (Euclidean loss, eq. 6, initialized from the
classification teacher) -> alignment student (eq. 7, hidden-layer target, initialized from the
distilled classification student), NRMSE reported; and verification (eq. 9) with the
hidden-layer target. Tiny networks, a few steps each: this checks the chain runs and each link
does its job, not the paper's numbers.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kdface.data import encode_image
from kdface.data._synthetic import (identity_params, render_identity_sample_with_landmarks,
                                    sample_rng)
from kdface.metrics import nrmse_dataset
from kdface.training import TrainConfig, restore_run
from kdface.training._run import run

HW = (32, 32)
IDENTITIES, PER_ID = 4, 10
TEACHER = {"channels": (8, 16, 16, 16), "units": (0, 1, 0, 0), "embedding_size": 8,
           "batch_norm": True}
# Landmarks are regressed in pixels (a summed squared error of ~10^3 at the start): clipping the
# gradient norm keeps these few steps finite at a rate that still learns in 40 steps (measured:
# NRMSE 0.42 at lr 0.1 and 0.78 at lr 0.02, against 3.2 for an all-zero prediction).
ALIGN = {"learning_rate": 0.1, "clip_norm": 1.0, "steps": 40}
STUDENT = {"channels": (4, 8, 8, 8), "units": (0, 1, 0, 0), "embedding_size": 8,
           "batch_norm": True}


def _faces(first_sample: int, per_id: int):
    """Synthetic faces (kdface.data's generator) at ``HW``: images uint8, landmarks, labels."""
    images, points, labels = [], [], []
    for identity in range(IDENTITIES):
        params = identity_params(7, identity)
        for k in range(first_sample, first_sample + per_id):
            image, lm = render_identity_sample_with_landmarks(params, sample_rng(7, identity, k))
            images.append(cv2.resize(image, HW[::-1], interpolation=cv2.INTER_AREA))
            points.append(lm * np.float32(HW[0] / image.shape[0]))
            labels.append(identity)
    return np.stack(images), np.stack(points).astype(np.float32), np.asarray(labels)


@pytest.fixture(scope="module")
def data():
    images, points, labels = _faces(0, PER_ID)
    source = [{"image": encode_image(im, format="png"), "label": int(y), "landmarks": p}
              for im, p, y in zip(images, points, labels)]
    return source, _faces(PER_ID, 3)


def _run(tmp, name, source, **changes):
    base = dict(workdir=str(tmp / name), recipe="transfer", student="sphereface_custom",
                student_options=STUDENT, head="softmax", input_size=HW, batch_size=8, steps=8,
                learning_rate=0.01, nesterov=True, schedule="constant", temperature=4.0,
                save_every=1000, log_every=1, async_checkpoints=False, progress=False,
                flip=False, crop_from=(36, 36))
    base.update(changes)
    summary = run(TrainConfig(**base), data_dir="", source=source, num_classes=IDENTITIES,
                  val_sets=[])
    assert np.isfinite(summary["metrics"]["loss"]), (name, summary)
    return str(tmp / name), summary


def _landmark_nrmse(workdir, held_out) -> float:
    images, points, _ = held_out
    net = restore_run(workdir).network
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    pred = np.asarray(net(x)["landmarks"])
    return float(nrmse_dataset(pred, points)["nrmse"])


def test_classification_to_alignment_and_verification(tmp_path, data):
    source, held_out = data
    scratch = dict(recipe="scratch", learning_rate=0.1)
    # Teacher and student pretrained with softmax alone (eq. 3: full initialization).
    t_cls, _ = _run(tmp_path, "t_cls", source, student_options=TEACHER, steps=10, **scratch)
    s_init, _ = _run(tmp_path, "s_init", source, steps=10, **scratch)
    # Classification distillation from the full initialization (eq. 4): softmax + soft target.
    s_cls, summary = _run(tmp_path, "s_cls", source, transfer_task="classification",
                          teacher_checkpoint=t_cls, init_checkpoint=s_init)
    assert {"softmax", "soft_prediction"} <= set(summary["metrics"])

    # Alignment teacher: Euclidean loss only, initialized from the classification teacher
    # (a classification run has no landmark head: it starts fresh, the rest is copied).
    t_align, summary = _run(tmp_path, "t_align", source, transfer_task="alignment",
                            student_options=TEACHER, init_checkpoint=t_cls, lambda_soft=0.0,
                            lambda_hidden=0.0, **ALIGN)
    assert set(summary["metrics"]) >= {"landmark"} and "hidden" not in summary["metrics"]
    # Alignment student: landmarks + the teacher's hidden layer (β = 1, α = 0), initialized
    # from the distilled classification student, the alignment run as its teacher.
    s_align, summary = _run(tmp_path, "s_align", source, transfer_task="alignment",
                            teacher_checkpoint=t_align, init_checkpoint=s_cls,
                            lambda_soft=0.0, lambda_hidden=1.0, **ALIGN)
    assert {"landmark", "hidden"} <= set(summary["metrics"])
    # NRMSE (inter-ocular) on held-out faces: both alignment nets beat an all-zero prediction
    # (where a fresh landmark head starts).
    teacher_nrmse = _landmark_nrmse(t_align, held_out)
    student_nrmse = _landmark_nrmse(s_align, held_out)
    mean_face = held_out[1].mean(axis=0, keepdims=True).repeat(len(held_out[1]), axis=0)
    chance = float(nrmse_dataset(np.zeros_like(held_out[1]), held_out[1])["nrmse"])
    print(f"NRMSE held-out: alignment teacher {teacher_nrmse:.3f}, student {student_nrmse:.3f}, "
          f"all-zero prediction {chance:.3f}, mean-face oracle "
          f"{float(nrmse_dataset(mean_face, held_out[1])['nrmse']):.3f}")
    assert np.isfinite(teacher_nrmse) and np.isfinite(student_nrmse)
    assert teacher_nrmse < chance / 2 and student_nrmse < chance / 2

    # Verification teacher (triplet + softmax, from the classification teacher) and a student
    # with the hidden-layer target (β = 1: the β column of Tables 4/5) from the classification
    # student.
    t_ver, _ = _run(tmp_path, "t_ver", source, transfer_task="verification",
                    student_options=TEACHER, init_checkpoint=t_cls, lambda_soft=0.0,
                    lambda_hidden=0.0, extra_softmax=1.0)
    _, summary = _run(tmp_path, "s_ver", source, transfer_task="verification",
                      teacher_checkpoint=t_ver, init_checkpoint=s_cls, lambda_soft=0.0,
                      lambda_hidden=1.0, extra_softmax=1.0)
    assert {"triplet", "hidden", "softmax"} <= set(summary["metrics"])
