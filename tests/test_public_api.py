"""The public names docs/ARCHITECTURE.md promises, with the signatures and defaults it states."""
import inspect

import pytest

import kdface.data
import kdface.losses
import kdface.metrics
import kdface.models

LOSS_NAMES = ["pwr_loss", "mk_mmd", "rkd_distance_loss", "rkd_angle_loss", "darkrank_hard_loss",
              "hinton_kd_loss", "angular_distillation_loss", "normalized_l2_loss",
              "cosface_logits", "arcface_logits", "sphereface_logits", "margin_cross_entropy",
              "softmax_cross_entropy", "triplet_loss", "landmark_l2_loss", "nrmse"]
BACKBONES = ["sphereface20", "sphereface36_thin", "sphereface64", "iresnet18", "iresnet34",
             "iresnet50", "iresnet100", "se_iresnet100", "resnet50", "vargfacenet", "vargnet",
             "mobilenet_v1", "mobilenet_v2", "mobilefacenet", "mobilefacenet_r"]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_exported_and_documented(name):
    fn = getattr(kdface.losses, name)
    doc = inspect.getdoc(fn) or ""
    assert "[" in doc, f"{name} docstring names no shapes"
    assert "et al." in doc or "eq" in doc.lower(), f"{name} docstring cites no paper or equation"


def _kwonly_defaults(fn):
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_pwr_loss_signature():
    assert _kwonly_defaults(kdface.losses.pwr_loss) == {
        "relation": "cosine", "inversion": "exp", "margin": "teacher_diff", "margin_value": 0.0,
        "power": 1.0, "beta": 1.0, "method": "auto", "tie_tolerance": 0.0}


def test_mk_mmd_signature():
    defaults = _kwonly_defaults(kdface.losses.mk_mmd)
    assert tuple(defaults["multipliers"]) == (1, 2, 4, 8, 16)
    assert defaults["normalize"] is True and defaults["estimator"] == "biased"


def test_hinton_takes_keyword_temperature():
    assert "temperature" in _kwonly_defaults(kdface.losses.hinton_kd_loss)


def test_every_design_backbone_is_registered():
    assert set(BACKBONES) <= set(kdface.models.names())


def test_data_and_metrics_entry_points():
    for name in ("read_verification_bin", "write_verification_bin", "RecordIO",
                 "write_recordio"):
        assert callable(getattr(kdface.data, name))
    params = inspect.signature(kdface.metrics.verification).parameters
    assert params["folds"].default == 10 and params["folds"].kind is inspect.Parameter.KEYWORD_ONLY
