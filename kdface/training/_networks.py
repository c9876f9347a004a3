"""The networks of a planned run: the frozen teacher and the student, built from a ``FitPlan``.

The plan (``_plan.py``) has already checked that the teacher's source exists and fits; here the
weights are loaded (``restore_run``, or kdface.interop for ``pth:`` / ``onnx:`` teachers) and the
student is initialized (``build_run_student``, or from ``--init_checkpoint``). The training loop
and the teacher cache both build the teacher here.
"""
from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from kdface.distill import DistillStudent, FaceNetwork
from kdface.training._plan import FitPlan
from kdface.training._restore import build_run_student, init_from_run, restore_run


def init_key(seed: int) -> jax.Array:
    """The key networks are initialized from: the 'rbg' generator, whose initializers compile
    in a fraction of threefry's time on CPU (measured here: ~0.8 s vs ~14 s per new parameter
    shape under load) and which is the recommended generator on TPU."""
    return jax.random.key(seed, impl="rbg")


def build_teacher(plan: FitPlan) -> FaceNetwork | None:
    """The frozen teacher, eval mode: the network of the kdface run the plan names, rebuilt
    from that run's config.json (``restore_run``), or a third-party pretrained one
    (``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH``, kdface.interop); None without a teacher."""
    source = plan.teacher
    if source.kind == "none":
        return None
    if source.kind == "imported":
        from kdface import interop
        return interop.imported_teacher(source.spec, plan.recipe, num_classes=plan.num_classes,
                                        input_size=tuple(plan.config.input_size),
                                        options=plan.config.teacher_options)
    teacher = restore_run(source.spec).network
    teacher.eval()
    return teacher


def teacher_stage_shapes(plan: FitPlan, teacher: FaceNetwork | None):
    """The stage shapes the student's adapters fit: the plan's, or for an imported teacher
    (whose shapes the plan cannot know without reading its file) the loaded network's."""
    if not plan.recipe.adapters:
        return None
    if plan.teacher_stage_shapes is not None:
        return [list(s) for s in plan.teacher_stage_shapes]
    return [list(s) for s in teacher.backbone.stage_shapes(tuple(plan.config.input_size))]


def make_student(plan: FitPlan, teacher: FaceNetwork | None) -> DistillStudent:
    """The freshly initialized student (``build_run_student``), or, with ``--init_checkpoint``,
    initialized from that run (Nikitin et al. 2020 / Wang et al. 2017: a pretrained student)."""
    config, recipe = plan.config, plan.recipe
    student = build_run_student(config, num_classes=plan.num_classes, head=recipe.head,
                                landmark_head=recipe.landmark_head,
                                rngs=nnx.Rngs(init_key(config.seed)),
                                teacher_stage_shapes=teacher_stage_shapes(plan, teacher))
    if config.init_checkpoint:
        copied = init_from_run(student, config.init_checkpoint)
        present = {"head": student.network.head, "adapters": student.adapters,
                   "landmark_head": student.network.landmark_head}
        skipped = [n for n, part in present.items() if part is not None and n not in copied]
        if skipped:
            logging.warning("--init_checkpoint %s: %s keep their fresh initialization (not in "
                            "that run, or of other shapes)", config.init_checkpoint, skipped)
    return student


def build_networks(plan: FitPlan) -> tuple[DistillStudent, FaceNetwork | None]:
    """``(student, teacher)`` of the planned run: the teacher loaded, the student built or
    initialized, and what only a loaded imported teacher can tell checked."""
    teacher = build_teacher(plan)
    student = make_student(plan, teacher)
    check_loaded_teacher(plan, student, teacher)
    return student, teacher


def check_loaded_teacher(plan: FitPlan, student: DistillStudent,
                         teacher: FaceNetwork | None) -> None:
    """What the plan cannot check before an imported teacher's file is read: its embedding
    size and class count against the terms that compare them (a kdface teacher run was checked
    by the plan, from its config.json)."""
    if teacher is None or plan.teacher.kind != "imported":
        return
    recipe = plan.recipe
    s_size = student.network.backbone.embedding_size
    t_size = teacher.backbone.embedding_size
    same_embedding = recipe.requiring("same_embedding")
    if s_size != t_size and same_embedding:
        raise ValueError(f"student embedding {s_size} != teacher embedding {t_size}: the "
                         f"recipe's terms {list(same_embedding)} compare embeddings directly")
    same_classes = recipe.requiring("same_classes")
    s_classes, t_classes = student.network.num_classes, teacher.num_classes
    if s_classes != t_classes and same_classes:
        raise ValueError(f"terms {list(same_classes)} compare class logits, which needs the same "
                         f"classes: student {s_classes}, teacher {t_classes}")


def abstract_networks(plan: FitPlan) -> tuple[DistillStudent, FaceNetwork | None]:
    """``(student, teacher)`` of the planned run as shapes only (``nnx.eval_shape``: no weight is
    computed or read; an imported teacher is read from its file), for a compile-only plan."""
    config, recipe = plan.config, plan.recipe
    source = plan.teacher
    teacher = None
    if source.kind == "imported":
        teacher = build_teacher(plan)
    elif source.kind in ("run", "flags"):
        run = source.run or {}
        tcfg = source.config
        teacher = nnx.eval_shape(lambda: build_run_student(
            tcfg, num_classes=int(run.get("num_classes", plan.num_classes)),
            head=run.get("head_used", recipe.head),
            landmark_head=bool(run.get("landmark_head", False)), rngs=nnx.Rngs(0),
            teacher_stage_shapes=run.get("teacher_stage_shapes"))).network
        teacher.eval()
    shapes = teacher_stage_shapes(plan, teacher)
    student = nnx.eval_shape(lambda: build_run_student(
        config, num_classes=plan.num_classes, head=recipe.head,
        landmark_head=recipe.landmark_head, rngs=nnx.Rngs(init_key(config.seed)),
        teacher_stage_shapes=shapes))
    return student, teacher
