"""The cases of ``benchmarks.loss_throughput``: losses, implementations, inputs, cost models.

A *loss* (``LOSSES``) is one benchmarked quantity (e.g. PWR exp / teacher-diff); each has
implementations (``Impl``): kdface's JAX functions and the PyTorch references of
``benchmarks.torch_reference`` in two roles, ``peer`` (what users of the public reference code run
today) and ``best`` (a best-effort PyTorch version of kdface's algorithm). Losses with one
standard formulation (Hinton KD, angular, margin heads) have a single torch version in both roles.

Every implementation returns the same value as kdface's function (torchdistill's RKD
normalization is rescaled by a scalar, which costs nothing), so the benchmark can check values
side by side. Cost models (``time_exp``/``mem_exp``: exponents in N; ``mem_bytes``: analytic peak
estimates of the memory-bound peers) let the runner skip a case *before* running it when it
would pass the memory cap or the per-call time limit.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 512
    classes: int = 2048
    seed: int = 0
    threads: int = 1        # 1: the case process is pinned to one core (see loss_throughput)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of a loss. ``build(n, cfg)`` returns ``fn(*args) -> scalar``."""

    name: str
    framework: str                       # 'jax' | 'torch'
    role: str                            # 'kdface' | 'peer' | 'best' | 'both'
    build: Callable[[int, Config], Callable[..., Any]]
    time_exp: float                      # predicted time ~ N^time_exp from the last size
    mem_exp: float                       # predicted peak ~ N^mem_exp from the last size
    mem_bytes: Callable[[int, Config], float] | None = None   # analytic peak estimate
    limit: Callable[[int], str | None] | None = None          # static "not possible" reason
    matches: str | None = None           # kdface rows: the torch 'best' impl of the same method
    always_n: tuple[int, ...] = ()       # run at these N past the per-call time limit (targets)


@dataclasses.dataclass(frozen=True)
class Loss:
    key: str
    title: str
    kind: str                            # 'embed' | 'logits' | 'head' | 'ekd' | 'adadistill'
    impls: tuple[Impl, ...]
    work: Callable[[int, Config], float]
    work_unit: str
    sizes: tuple[int, ...]               # the default run: enough to cover targets and scaling
    full_sizes: tuple[int, ...] = ()     # --full
    notes: str = ""

    def impl(self, name: str) -> Impl:
        return next(i for i in self.impls if i.name == name)


PWR_SIZES = (64, 128, 160, 192, 256, 512, 1024, 2048, 4096)   # 160/192: the N=192 target
SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# The default run (~15 min on the shared 2-core machine) takes these subsets.
DEFAULT_SIZES = {
    "pwr_exp_tdiff": PWR_SIZES,
    "pwr_diff_none": (64, 128, 192, 512),
    "pwr_ranknet_const": (64, 128, 192, 512),
    "mmd": (64, 256, 512, 1024, 4096),
    "rkd_da": (64, 128, 256, 512, 1024),
    "rkd_d": (64, 256, 1024, 4096),
    "rkd_a": (64, 256, 512),
    "darkrank": (64, 256, 512, 4096),
    "ekd": (64, 256, 1024, 2048, 4096),
    "adadistill_arc": (64, 256, 1024, 4096),
    "adadistill_cos": (64, 256, 1024, 4096),
}
# ... and runs these implementations only up to this N (slow references whose scaling the
# first sizes already show).
DEFAULT_MAX_N = {
    ("pwr_exp_tdiff", "torch tiled"): 160,
    ("pwr_diff_none", "torch tiled"): 128,
    ("pwr_ranknet_const", "torch tiled"): 128,
    ("rkd_d", "torch Gram"): 1024,
}
PWR_VARIANTS = {
    "pwr_exp_tdiff": dict(inversion="exp", margin="teacher_diff", margin_value=0.0),
    "pwr_diff_none": dict(inversion="diff", margin="none", margin_value=0.0),
    "pwr_ranknet_const": dict(inversion="ranknet", margin="const", margin_value=0.1),
}


def num_pairs(n: int) -> int:
    return n * (n - 1) // 2


# ------------------------------------------------------------------------------- inputs

def make_inputs(kind: str, n: int, cfg: Config) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """``(arrays, grad_argnums)``: float32 inputs for a case (deterministic in ``n``, seed)."""
    rng = np.random.default_rng(cfg.seed * 100_003 + n)
    if kind == "embed":      # student = noisy teacher, so rankings partly agree
        teacher = rng.standard_normal((n, cfg.dim), dtype=np.float32)
        noise = rng.standard_normal((n, cfg.dim), dtype=np.float32)
        return (0.8 * teacher + 0.6 * noise, teacher), (0,)
    if kind == "logits":
        teacher = 3.0 * rng.standard_normal((n, cfg.classes), dtype=np.float32)
        noise = rng.standard_normal((n, cfg.classes), dtype=np.float32)
        return (teacher + noise, teacher), (0,)
    if kind in ("ekd", "adadistill"):
        return _stateful_inputs(kind, n, cfg, rng)
    emb = rng.standard_normal((n, cfg.dim), dtype=np.float32)
    weight = rng.standard_normal((cfg.classes, cfg.dim), dtype=np.float32)
    labels = rng.integers(0, cfg.classes, size=n).astype(np.int32)
    return (emb, weight, labels), (0, 1)


# EKD's running thresholds at the start of every timed call, student and teacher: about the
# negatives' similarities at FPR 1e-1 .. 1e-6 of these inputs (cosines of independent 512-d
# directions, std 1/sqrt(512)); both frameworks start from them.
EKD_BENCH_STATE = (0.06, 0.10, 0.14, 0.17, 0.19, 0.21)


def _stateful_inputs(kind: str, n: int, cfg: Config, rng: np.random.Generator
                     ) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """EKD: ``(student, teacher, labels)``, the batch of TFace's recipe: half random identities,
    half identity-balanced (4 images per identity). AdaDistill: ``(student, teacher, labels,
    centres [D, C])``, labels uniform over C (duplicates included), centres N(0, 0.01) as the
    official head's initialization. Gradient to the student only."""
    if kind == "ekd":
        half = n // 2
        balanced = np.repeat(np.arange(-(-half // 4)), 4)[:half]
        randoms = rng.integers(10 ** 6, 2 * 10 ** 6, size=n - half)
        labels = rng.permutation(np.concatenate([balanced, randoms])).astype(np.int32)
        # an identity direction shared by the images of an identity: positives' cosines ~0.25
        ids = np.unique(labels, return_inverse=True)[1]
        identity = rng.standard_normal((ids.max() + 1, cfg.dim), dtype=np.float32)
        teacher = 0.6 * identity[ids] + rng.standard_normal((n, cfg.dim), dtype=np.float32)
        student = 0.8 * teacher + 0.6 * rng.standard_normal((n, cfg.dim), dtype=np.float32)
        return (student, teacher, labels), (0,)
    teacher = rng.standard_normal((n, cfg.dim), dtype=np.float32)
    student = 0.8 * teacher + 0.6 * rng.standard_normal((n, cfg.dim), dtype=np.float32)
    labels = rng.integers(0, cfg.classes, size=n).astype(np.int32)
    centres = 0.01 * rng.standard_normal((cfg.dim, cfg.classes), dtype=np.float32)
    return (student, teacher, labels, centres), (0,)


# --------------------------------------------------------------------------- JAX builders

def _kdface_pwr(method: str, variant: dict) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        from kdface.losses import pwr_loss
        return lambda s, t: pwr_loss(s, t, relation="cosine", method=method, **variant)
    return build


def _kdface(name: str, **options: Any) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        from kdface import losses
        fn = getattr(losses, name)
        return lambda s, t: fn(s, t, **options)
    return build


def _kdface_rkd_da(n: int, cfg: Config) -> Callable:
    from kdface.losses import rkd_angle_loss, rkd_distance_loss
    return lambda s, t: rkd_distance_loss(s, t) + rkd_angle_loss(s, t)


def _kdface_margin(head: str) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        import jax.numpy as jnp

        from kdface import losses
        logits_fn = getattr(losses, head)

        def unit(a):
            return a / jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=1, keepdims=True), 1e-24))

        def fn(emb, weight, labels):
            cos = jnp.matmul(unit(emb), unit(weight).T)
            return losses.margin_cross_entropy(logits_fn(cos, labels), labels)
        return fn
    return build


def _kdface_ekd(n: int, cfg: Config) -> Callable:
    import jax.numpy as jnp

    from kdface.losses import EkdState, ekd_loss
    state = EkdState(jnp.asarray(EKD_BENCH_STATE, jnp.float32),
                     jnp.asarray(EKD_BENCH_STATE, jnp.float32))
    return lambda s, t, y: ekd_loss(s, t, y, state)[0]


def _kdface_adadistill(head: str) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        from kdface.losses import adadistill_loss
        return lambda s, t, y, c: adadistill_loss(s, t, y, c, head=head)[0]
    return build


# ------------------------------------------------------------------------- torch builders

def _torch_ekd(n: int, cfg: Config) -> Callable:
    import torch

    from benchmarks._torch_stateful import ekd_official
    anchors = torch.tensor(EKD_BENCH_STATE, dtype=torch.float32)
    return lambda s, t, y: ekd_official(s, t, y, anchors, anchors)


def _torch_adadistill(head: str) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        from benchmarks._torch_stateful import adadistill_official
        m = {"arcface": 0.45, "cosface": 0.35}[head]
        return lambda s, t, y, c: adadistill_official(s, t, y, c, head=head, m=m)
    return build


def _torch(name: str, scale: Callable[[int], float] | None = None, **options: Any
           ) -> Callable[[int, Config], Callable]:
    def build(n: int, cfg: Config) -> Callable:
        from benchmarks import torch_reference as ref
        fn = getattr(ref, name)
        factor = 1.0 if scale is None else scale(n)
        if factor == 1.0:
            return lambda *a: fn(*a, **options)
        return lambda *a: factor * fn(*a, **options)
    return build


def _torch_rkd_da_torchdistill(n: int, cfg: Config) -> Callable:
    from benchmarks import torch_reference as ref
    fd, fa = ref.KDFACE_SCALE["rkd_distance"](n), ref.KDFACE_SCALE["rkd_angle"](n)
    return lambda s, t: (fd * ref.rkd_distance_torchdistill(s, t)
                         + fa * ref.rkd_angle_torchdistill(s, t))


def _scale(name: str) -> Callable[[int], float]:
    def factor(n: int) -> float:
        from benchmarks.torch_reference import KDFACE_SCALE
        return KDFACE_SCALE[name](n)
    return factor


# ----------------------------------------------------------------------- static limits

def _module_missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not in this checkout"
    return None


def _kdface_dense_limit(n: int) -> str | None:
    m = num_pairs(n)
    if m * m > 2**31 - 1:
        return f"kdface method='dense' refuses [M, M] with M^2 = {m * m:.2g} >= 2^31"
    return None


def _tiled_limit(n: int) -> str | None:
    return _module_missing("kdface.losses._pwr_tiled")


def _sorted_limit(n: int) -> str | None:
    return _module_missing("kdface.losses._pwr_sorted")


# Peak bytes of the memory-bound peers, per element of their big tensors (calibrated on N=64..128
# runs: RSS peak / (elements * 4 bytes), rounded up).
def _dense_official_bytes(n: int, cfg: Config) -> float:
    m = num_pairs(n)
    return 9.0 * 4 * m * m


def _mmd_broadcast_bytes(n: int, cfg: Config) -> float:
    return 4.0 * 4 * (2 * n) ** 2 * cfg.dim


def _rkd_angle_td_bytes(n: int, cfg: Config) -> float:
    return 4.0 * 4 * n * n * cfg.dim + 4.0 * 4 * n ** 3


def _torch_sorted_bytes(n: int, cfg: Config) -> float:
    events = 2 * num_pairs(n)
    size = 1 << max(1, (events - 1).bit_length())
    return 64.0 * size * max(1, size.bit_length() - 1) / 2


# ------------------------------------------------------------------------------ registry

def _pwr_loss(key: str) -> Loss:
    variant = PWR_VARIANTS[key]
    separable = variant["inversion"] in ("diff", "exp")
    impls = [
        Impl("kdface dense", "jax", "kdface", _kdface_pwr("dense", variant), 4, 4,
             limit=_kdface_dense_limit, matches="torch dense (official)"),
        Impl("kdface tiled", "jax", "kdface", _kdface_pwr("tiled", variant), 4, 2,
             limit=_tiled_limit, matches="torch tiled", always_n=(512,)),
    ]
    if separable:
        impls.append(Impl("kdface sorted", "jax", "kdface", _kdface_pwr("sorted", variant),
                          2.4, 2.2, limit=_sorted_limit, matches="torch sorted",
                          always_n=(4096,) if key == "pwr_exp_tdiff" else ()))
    impls += [
        Impl("torch dense (official)", "torch", "peer", _torch("pwr_dense_official", **variant),
             4, 4, mem_bytes=_dense_official_bytes),
        Impl("torch tiled", "torch", "best", _torch("pwr_tiled_torch", **variant), 4, 2),
    ]
    if separable:
        impls.append(Impl("torch sorted", "torch", "best", _torch("pwr_sorted_torch", **variant),
                          2.4, 2.3, mem_bytes=_torch_sorted_bytes))
    inv, mar = variant["inversion"], variant["margin"]
    extra = f", margin {variant['margin_value']}" if mar == "const" else ""
    return Loss(key, f"PWR {inv} / {mar}{extra} (cosine)", "embed", tuple(impls),
                lambda n, cfg: float(num_pairs(n)) ** 2, "pair comparisons", PWR_SIZES,
                PWR_SIZES)


def _registry() -> dict[str, Loss]:
    losses = {key: _pwr_loss(key) for key in PWR_VARIANTS}
    losses["mmd"] = Loss(
        "mmd", "MK-MMD (biased, 5 kernels, normalized)", "embed", (
            Impl("kdface", "jax", "kdface", _kdface("mk_mmd"), 2, 2, matches="torch GEMM"),
            Impl("torch broadcast (library)", "torch", "peer", _torch("mmd_broadcast"), 2, 2,
                 mem_bytes=_mmd_broadcast_bytes),
            Impl("torch GEMM", "torch", "best", _torch("mmd_gemm_torch"), 2, 2),
        ), lambda n, cfg: float(2 * n) ** 2, "kernel pairs", SIZES)
    losses["rkd_d"] = Loss(
        "rkd_d", "RKD-D", "embed", (
            Impl("kdface", "jax", "kdface", _kdface("rkd_distance_loss"), 2, 2,
                 matches="torch Gram"),
            Impl("torchdistill", "torch", "peer",
                 _torch("rkd_distance_torchdistill", _scale("rkd_distance")), 2, 2),
            Impl("torch Gram", "torch", "best", _torch("rkd_distance_torch"), 2, 2),
        ), lambda n, cfg: float(n) ** 2, "pairs", SIZES)
    losses["rkd_a"] = Loss(
        "rkd_a", "RKD-A", "embed", (
            Impl("kdface", "jax", "kdface", _kdface("rkd_angle_loss"), 3, 2,
                 matches="torch Gram fused"),
            Impl("torchdistill", "torch", "peer",
                 _torch("rkd_angle_torchdistill", _scale("rkd_angle")), 3, 3,
                 mem_bytes=_rkd_angle_td_bytes),
            Impl("torch Gram fused", "torch", "best", _torch("rkd_angle_torch"), 3, 2),
        ), lambda n, cfg: float(n) ** 3, "triplets", SIZES)
    losses["rkd_da"] = Loss(
        "rkd_da", "RKD-D + RKD-A", "embed", (
            Impl("kdface", "jax", "kdface", _kdface_rkd_da, 3, 2, matches="torch Gram fused"),
            Impl("torchdistill", "torch", "peer", _torch_rkd_da_torchdistill, 3, 3,
                 mem_bytes=_rkd_angle_td_bytes, always_n=(512,)),
            Impl("torch Gram fused", "torch", "best", _torch("rkd_da_torch"), 3, 2),
        ), lambda n, cfg: float(n) ** 3, "triplets", SIZES)
    losses["darkrank"] = Loss(
        "darkrank", "DarkRank-hard (alpha 3, beta 3, full list)", "embed", (
            Impl("kdface", "jax", "kdface", _kdface("darkrank_hard_loss"), 2, 2,
                 matches="torch logcumsumexp"),
            Impl("torch loop (Park et al.)", "torch", "peer", _torch("darkrank_hard_park"),
                 3, 2),
            Impl("torch logcumsumexp", "torch", "best", _torch("darkrank_hard_torch"), 2, 2),
        ), lambda n, cfg: float(n) ** 2, "pairs", SIZES)
    losses["hinton"] = Loss(
        "hinton", "Hinton KD (tau 4)", "logits", (
            Impl("kdface", "jax", "kdface", _kdface("hinton_kd_loss", temperature=4.0), 1, 1,
                 matches="torch"),
            Impl("torch", "torch", "both", _torch("hinton_kd_torch", temperature=4.0), 1, 1),
        ), lambda n, cfg: float(n) * cfg.classes, "logits", SIZES,
        notes="[N, C] logits")
    losses["angular"] = Loss(
        "angular", "Angular distillation (ShrinkTeaNet eq. 4)", "embed", (
            Impl("kdface", "jax", "kdface", _kdface("angular_distillation_loss"), 1, 1,
                 matches="torch"),
            Impl("torch", "torch", "both", _torch("angular_torch"), 1, 1),
        ), lambda n, cfg: float(n), "samples", SIZES)
    for head, title, ref in (("cosface", "CosFace head + CE (s 64, m 0.35)", "cosface_ce_torch"),
                             ("arcface", "ArcFace head + CE (s 64, m 0.5)", "arcface_ce_torch")):
        losses[head] = Loss(
            head, title, "head", (
                Impl("kdface", "jax", "kdface", _kdface_margin(f"{head}_logits"), 1, 1,
                     matches="torch"),
                Impl("torch", "torch", "both", _torch(ref), 1, 1),
            ), lambda n, cfg: float(n) * cfg.classes, "logits", SIZES,
            notes="embeddings [N, D] through a normalized [C, D] head; grads to both")
    losses["ekd"] = Loss(
        "ekd", "EKD (TFace constants: 6 FPR anchors, T 0.01, top 2000)", "ekd", (
            Impl("kdface", "jax", "kdface", _kdface_ekd, 2.2, 2, matches="torch (TFace)"),
            Impl("torch (TFace)", "torch", "both", _torch_ekd, 2.2, 2),
        ), lambda n, cfg: float(num_pairs(n)), "pairs", SIZES,
        notes="half random, half 4-per-identity labels; thresholds start from a fixed state")
    for key, head, title in (("adadistill_arc", "arcface", "AdaDistill ArcFace (s 64, m 0.45)"),
                             ("adadistill_cos", "cosface", "AdaDistill CosFace (s 64, m 0.35)")):
        losses[key] = Loss(
            key, title, "adadistill", (
                Impl("kdface", "jax", "kdface", _kdface_adadistill(head), 1, 1,
                     matches="torch (official)"),
                Impl("torch (official)", "torch", "both", _torch_adadistill(head), 1, 1),
            ), lambda n, cfg: float(n) * cfg.classes, "logits", SIZES,
            notes="centre update of the batch's labels, then the margin head [D, C] + CE; "
                  "grads to the student")
    return losses


def _with_default_sizes(loss: Loss) -> Loss:
    full = loss.full_sizes or loss.sizes
    return dataclasses.replace(loss, full_sizes=full,
                               sizes=DEFAULT_SIZES.get(loss.key, (64, 256, 1024, 4096)))


LOSSES = {key: _with_default_sizes(loss) for key, loss in _registry().items()}
DEFAULT_ORDER = ("pwr_exp_tdiff", "mmd", "rkd_da", "pwr_diff_none", "pwr_ranknet_const",
                 "rkd_d", "rkd_a", "darkrank", "hinton", "angular", "cosface", "arcface",
                 "ekd", "adadistill_arc", "adadistill_cos")
