"""kdface: knowledge distillation for deep face recognition in JAX/Flax."""
import os as _os

__version__ = "0.1.0"

# XLA:CPU hands each convolution to YNNPACK by default; for the regular 3x3 convolutions of the
# face backbones its own convolution is faster on the CPUs measured here (2-core AMD EPYC,
# float32, batch 16: IResNet-100 forward 2.74 s vs 3.1 s; the kd_im step with an IResNet-100
# teacher 3.8 s vs 4.4 s, the MobileFaceNet student step 1.24 s vs 1.44 s;
# benchmarks/TRAIN_STEP.md). Set here, at import, because XLA reads its flags once when the
# backend starts; it changes nothing on accelerators, and an XLA_FLAGS that already names the
# option is left as it is.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + CPU_XLA_FLAG).strip()
