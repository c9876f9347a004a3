"""Interoperability: third-party pretrained teachers in, ONNX students out.

* Teachers: insightface IResNet-18/34/50/100 from a PyTorch state dict or arcface_torch
  checkpoint (read without PyTorch, by a restricted unpickler) or an ONNX file (either PyTorch
  exporter's graph), into kdface's IResNet; any other face-recognition ONNX graph (quantized,
  with its own preprocessing, any architecture the op table covers) as an
  :class:`OnnxGraphBackbone`, the graph interpreted in JAX with its input contract
  (:func:`load_teacher_backbone`, the trainer's ``--teacher=pth:[ARCH:]PATH`` /
  ``--teacher=onnx:[ARCH:][OPTIONS:]PATH``).
* Students: any kdface backbone to ONNX with a dynamic batch dimension (:func:`export_onnx`,
  ``python -m kdface.export``).

Neither PyTorch nor ONNX is imported by ``import kdface.interop``; ``onnx`` is needed only to read
or write ``.onnx`` files.
"""
from kdface.interop._iresnet_mapping import (IRESNET_ARCHS, infer_iresnet_arch,
                                             iresnet_from_state_dict)
from kdface.interop._onnx_export import (UnsupportedExportError, backbone_to_onnx,
                                         export_onnx)
from kdface.interop._onnx_import import NotIResNetGraphError, iresnet_state_from_onnx
from kdface.interop._onnx_teacher import (SUPPORTED_ONNX_OPS, GraphWeight, InputContract,
                                          OnnxGraphBackbone, onnx_graph_backbone)
from kdface.interop._teacher import (TEACHER_FORMATS, imported_teacher, is_imported_teacher,
                                     load_teacher_backbone, parse_teacher_spec,
                                     state_input_size, teacher_spec_options)
from kdface.interop._torch_state import UnsafeTorchPickleError, read_torch_state_dict

__all__ = ["IRESNET_ARCHS", "infer_iresnet_arch", "iresnet_from_state_dict"]
__all__ += ["UnsupportedExportError", "backbone_to_onnx", "export_onnx"]
__all__ += ["NotIResNetGraphError", "iresnet_state_from_onnx"]
__all__ += ["SUPPORTED_ONNX_OPS", "GraphWeight", "InputContract", "OnnxGraphBackbone",
            "onnx_graph_backbone"]
__all__ += ["TEACHER_FORMATS", "imported_teacher", "is_imported_teacher",
            "load_teacher_backbone", "parse_teacher_spec", "state_input_size",
            "teacher_spec_options"]
__all__ += ["UnsafeTorchPickleError", "read_torch_state_dict"]
