"""EKD (Huang et al. 2022) and AdaDistill (Boutros et al. 2024) as kdface methods: their
flagfiles train through ``kdface.train``'s path, and their comparison rows run the demo's
protocol (the flagfiles' values are pinned in tests/test_recipes_papers.py, the state in
tests/test_term_state.py, the losses in tests/test_losses_ekd.py and test_losses_adadistill.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from _train_helpers import CLASSES, HW, TINY, encoded_source, tiny_config
from kdface.comparison import METHODS
from kdface.distill import build_recipe
from kdface.training import TrainConfig

from test_recipes_papers import config_from_flagfile

FLAGFILES = ("ekd.flags", "adadistill_arc.flags", "adadistill_cos.flags")


def test_the_flagfiles_train_two_steps_on_tiny_networks(tmp_path):
    from kdface.training._run import run
    source = encoded_source(32)
    teacher_dir = str(tmp_path / "teacher")
    run(tiny_config(teacher_dir, steps=2, batch_size=16), data_dir="", source=source,
        num_classes=CLASSES, val_sets=[])
    for flagfile in FLAGFILES:
        config = config_from_flagfile(flagfile)
        # everything the flagfile sets but the sizes: tiny networks, 16 rows (EKD: 8 uniform +
        # 8 balanced at its 4 per identity), two steps
        sizes = dict(batch_size=16, uniform_images=8) if config.batch_sampler == "balanced" \
            else dict(batch_size=16)
        config = dataclasses.replace(
            config, workdir=str(tmp_path / flagfile), student="sphereface_custom",
            student_options=dict(TINY), teacher="sphereface_custom", teacher_options=dict(TINY),
            teacher_checkpoint=teacher_dir, input_size=HW, steps=2, epochs=None,
            decay_epochs=(), margin_scale=16.0, val_data=(), save_every=2, log_every=1,
            async_checkpoints=False, progress=False, **sizes)
        summary = run(config, data_dir="", source=source, num_classes=CLASSES, val_sets=[])
        assert summary["step"] == 2, flagfile
        assert np.isfinite(summary["metrics"]["loss"]), flagfile
        recipe = build_recipe(config.recipe, config)
        assert {t.name for t in recipe.terms} <= set(summary["metrics"]), flagfile


def test_the_comparison_rows_share_the_protocol_and_ekd_halves_the_demo_batch():
    rows = {m.name: m for m in METHODS}
    assert {"ekd", "adadistill_arc", "adadistill_cos"} <= set(rows)
    for name in ("ekd", "adadistill_arc", "adadistill_cos"):
        m = rows[name]
        assert m.uses_teacher and m.init_from is None
        # only the method's own settings: the shared teacher, student, steps, head scale and
        # seeds come from the comparison
        assert set(m.overrides) <= {"recipe", "batch_sampler", "uniform_images",
                                    "images_per_identity"}
    ekd = rows["ekd"].overrides
    # the demo's batch of 64 as TFace's 32 uniform + 32 identity-balanced, 4 per identity
    config = TrainConfig(workdir="unused", batch_size=64, **ekd)
    assert (config.uniform_images, config.batch_size - config.uniform_images) == (32, 32)
    assert config.images_per_identity == 4
    assert config.relation_groups == 1  # the pairs of the whole batch
