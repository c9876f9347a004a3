"""The op table of the general ONNX teacher (``_onnx_teacher``): ONNX ``op_type`` (default
domain) -> ``f(inputs, attrs) -> outputs`` in JAX / NumPy (``_onnx_array_ops``: elementwise,
shape and reduction ops; ``_onnx_layer_ops``: Conv, pooling, BatchNormalization, MatMul / Gemm,
Quantize/DequantizeLinear, Resize), and which inputs must be known without the image.
"""
from __future__ import annotations

from kdface.interop._onnx_array_ops import ARRAY_OPS
from kdface.interop._onnx_layer_ops import LAYER_OPS, dequantize

__all__ = ["OPS", "STATIC_INPUTS", "dequantize"]

OPS = {**ARRAY_OPS, **LAYER_OPS}

# Inputs read as Python values (shapes, axes, pads, sizes): they must be known without the image
# and stay NumPy (not network weights in the teacher's state).
STATIC_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4),
    "Pad": (1, 2, 3), "Split": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Resize": (1, 2, 3), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,),
    "Clip": (1, 2), "Dropout": (1, 2), "QuantizeLinear": (2,),
}
