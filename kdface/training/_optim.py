"""Optimizers and learning-rate schedules for the trainer (optax).

The papers train with SGD + momentum 0.9 and step schedules (Nikitin et al. 2020: lr 0.1 divided by
10 every 2 epochs; Duong et al. 2019: lr 0.1, momentum 0.9); AdamW and cosine are offered for modern
setups. Weight decay is applied to every parameter of rank >= 2 and to none of the biases,
BatchNorm scales or PReLU slopes (insightface convention: decaying PReLU slopes hurts).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import jax
import optax

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def learning_rate_schedule(*, base_lr: float, total_steps: int, schedule: str = "step",
                           warmup_steps: int = 0, decay_steps: Sequence[int] = (),
                           decay_factor: float = 0.1, final_lr_fraction: float = 0.0
                           ) -> optax.Schedule:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then the chosen schedule.

    ``step``: multiply by ``decay_factor`` at each step in ``decay_steps`` (absolute step numbers).
    ``cosine``: cosine decay from ``base_lr`` to ``base_lr * final_lr_fraction`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if base_lr < 0 or total_steps <= 0:
        raise ValueError(f"need base_lr >= 0 and total_steps > 0, got {base_lr}, {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}")
    if schedule == "constant":
        main = optax.constant_schedule(base_lr)
    elif schedule == "step":
        boundaries = {int(s) - warmup_steps: decay_factor for s in sorted(decay_steps)
                      if int(s) > warmup_steps}
        main = optax.piecewise_constant_schedule(base_lr, boundaries)
    else:
        main = optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps,
                                           alpha=final_lr_fraction)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


DEFAULT_STEPS = 1000  # when a config gives neither steps nor epochs


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """A run's length and schedule points in optimizer steps."""
    steps: int
    warmup_steps: int
    decay_steps: tuple[int, ...]


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
    """``ceil(epochs * num_examples / batch_size)``: the steps that cover ``epochs`` passes."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, "
                         f"{batch_size}")
    # Fractions keep e.g. 13 * 5_800_000 / 552 exact before the ceiling.
    return math.ceil(Fraction(str(epochs)) * num_examples / batch_size)


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, optimizer: str, learning_rate: optax.Schedule, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 5e-4,
                   clip_norm: float | None = None) -> optax.GradientTransformation:
    """SGD-momentum (weight decay as L2 added to the gradient, as the papers' MXNet code; Nesterov
    momentum with ``nesterov=True``) or AdamW (decoupled decay), optionally after global-norm
    gradient clipping."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    if optimizer == "sgd":
        if weight_decay:
            chain.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
        if nesterov and not momentum:
            raise ValueError("nesterov=True needs a non-zero momentum (--momentum)")
        chain.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    else:
        if nesterov:
            raise ValueError("nesterov applies to optimizer='sgd' only (--optimizer=sgd)")
        chain.append(optax.adamw(learning_rate, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*chain)
