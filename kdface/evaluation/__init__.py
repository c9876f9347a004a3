"""The evaluator behind ``python -m kdface.evaluate`` and ``kdface.compare``.

``_evaluators``: one protocol object per evaluation protocol (:class:`Verification` with the LR
probes, :class:`Identification`, :class:`IjbVerification`, :class:`Alignment`, :class:`ModelFacts`;
``_classification``: :class:`Classification`, Wang et al. 2017's top-1 on the held-out
images (``kdface.data._heldout``), with :class:`TrainingView`, the training set without them),
each built once from its settings, evaluating one run at a time and rendering its own report
sections (their interface, :class:`Evaluator`, in ``_evaluator``); ``_embedder``: runs (a training
workdir's network, or an exported-embedding file); ``_imported``: a third-party teacher file
(``pth:`` / ``onnx:``) as a run; ``_ijb``: IJB-B/C meta files, alignment and embedding;
``_sources``: verification sets and labelled datasets; ``_protocols``: each paper protocol on one
model (functions); ``_report``: the side-by-side comparison (runs x evaluators), markdown and plots.

Imports of JAX, Flax, the data stack, the trainer and the ONNX/PyTorch readers sit inside the
functions that need them, on purpose: ``import kdface.evaluation`` pulls in only NumPy and
``kdface.metrics``, so ``python -m kdface.evaluate --help`` and report-only runs start in under
a second.
"""
from __future__ import annotations

from kdface.evaluation._classification import (Classification, centre_view,
                                               classification_report, records_split)
from kdface.evaluation._embedder import Embedder, EmbeddingFile, resolve_workdir
from kdface.evaluation._evaluator import Evaluator
from kdface.evaluation._evaluators import (EVALUATORS, Alignment, Identification, IjbVerification,
                                           ModelFacts, Verification)
from kdface.evaluation._ijb import (IJB_NAMES, IjbMeta, aligned_crops, ijb_embeddings,
                                    ijb_report, parse_ijb_spec)
from kdface.evaluation._imported import TeacherEmbedder
from kdface.evaluation._protocols import (
    alignment_report,
    check_lr_sizes,
    export_embeddings,
    identification_arrays,
    identification_report,
    lr_report,
    verification_from_embeddings,
    verification_report,
)
from kdface.evaluation._report import (compare, markdown_table, open_run, to_jsonable,
                                       write_json_and_markdown, write_report)
from kdface.evaluation._sources import (
    FaceRecords,
    embed_records,
    load_sets,
    open_face_records,
    set_name,
    split_gallery_probe,
)
from kdface.data import (HELDOUT_FRACTION, HeldOutSplit, TrainingView, heldout_split,
                         record_key, split_training_source)

__all__ = ["aligned_crops", "Alignment", "alignment_report", "centre_view", "check_lr_sizes",
           "Classification", "classification_report", "compare", "embed_records", "Embedder",
           "EmbeddingFile", "Evaluator", "EVALUATORS",
           "export_embeddings", "FaceRecords", "HELDOUT_FRACTION", "heldout_split",
           "HeldOutSplit", "Identification", "identification_arrays",
           "identification_report", "ijb_embeddings", "IJB_NAMES", "ijb_report", "IjbMeta",
           "IjbVerification", "load_sets", "lr_report", "markdown_table", "ModelFacts",
           "open_face_records", "open_run", "parse_ijb_spec", "record_key", "records_split",
           "resolve_workdir", "set_name", "split_gallery_probe", "split_training_source",
           "TeacherEmbedder", "to_jsonable", "TrainingView", "Verification",
           "verification_from_embeddings", "verification_report", "write_json_and_markdown",
           "write_report"]
