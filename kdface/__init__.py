"""kdface: knowledge distillation for deep face recognition in JAX/Flax."""
__version__ = "0.1.0"
