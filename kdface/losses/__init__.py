"""Distillation and face-recognition losses as pure JAX functions (one family per module).

Every function takes arrays and keyword-only options and returns a scalar (or a per-example array
with ``reduction=None`` where offered). Docstrings name shapes and the seed paper's equation.
"""
# Each loss family adds its own import block below.
