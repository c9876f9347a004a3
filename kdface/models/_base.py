"""The contract every kdface backbone follows, so distillation code never special-cases a network.

A backbone is ``stem -> stage 0 -> stage 1 -> stage 2 -> stage 3 -> embedding head``. The four
stage outputs are the "stage features" (for 112x112 inputs most networks give spatial sizes
56/28/14/7, or 28/14/7/7 where the paper's network downsamples earlier; each network documents its
own). ShrinkTeaNet (Duong et al. 2019 eq. 6) passes an adapted student stage through the teacher's
*remaining* blocks, which is ``teacher.forward_from(i, feature)``.

Invariants every subclass keeps (tests check them for every registered name):

* ``model(x)`` -> ``[B, embedding_size]`` for ``x`` float ``[B, H, W, 3]``.
* ``model(x, return_stages=True)`` -> ``(embedding, [s0, s1, s2, s3])``.
* ``model.forward_from(i, stages[i])`` equals ``model(x)`` exactly (same ops, same order).
* ``model.stage_shapes(input_hw)`` gives the ``(H, W, C)`` of each stage without running it.
* Train vs eval mode is Flax NNX's ``model.train()`` / ``model.eval()`` (BatchNorm batch vs running
  statistics, Dropout on/off). A frozen teacher is always used in eval mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NUM_STAGES = 4


class Backbone(nnx.Module):
    """Base class: subclasses implement ``stem`` and set ``stages`` (and ``head``), or override
    ``run_stage`` / ``embed``."""

    embedding_size: int = 512

    def stem(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` image -> input of stage 0."""
        raise NotImplementedError

    def run_stage(self, i: int, h: jax.Array) -> jax.Array:
        """Runs stage ``i`` (0..3) on the output of stage ``i-1`` (or of the stem for ``i=0``).

        The default runs ``self.stages[i]``: a callable module (``nnx.Sequential``, a block), or
        a list of layers applied in order.
        """
        stage = self.stages[i]
        if callable(stage):
            return stage(h)
        for layer in stage:
            h = layer(h)
        return h

    def embed(self, h: jax.Array) -> jax.Array:
        """Output of stage 3 -> ``[B, embedding_size]`` embedding (everything after the stages).

        The default is ``self.head(h)``; networks without one embedding module override it.
        """
        return self.head(h)

    def __call__(self, x: jax.Array, *, return_stages: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got shape {tuple(x.shape)}")
        h = self.stem(x)
        stages = []
        for i in range(NUM_STAGES):
            h = self.run_stage(i, h)
            stages.append(h)
        emb = self.embed(h)
        return (emb, stages) if return_stages else emb

    def check_final_map(self, h: jax.Array) -> None:
        """Raises ValueError when stage 3's map is not the ``final_hw`` the FC was sized for
        (networks whose embedding flattens the last map set ``final_hw`` and ``input_size``)."""
        if tuple(h.shape[1:3]) != self.final_hw:
            raise ValueError(f"network built for input_size={self.input_size} expects a final "
                             f"{self.final_hw} feature map, got {tuple(h.shape)}; pass "
                             f"input_size=(H, W) when creating it")

    def forward_from(self, i: int, feature: jax.Array) -> jax.Array:
        """Runs stages ``i+1 .. 3`` and the embedding head on ``feature`` (stage ``i``'s output).

        ``i`` is 0..3; ``forward_from(3, s3)`` is just the embedding head.
        """
        if not 0 <= i < NUM_STAGES:
            raise ValueError(f"stage index must be in 0..{NUM_STAGES - 1}, got {i}")
        h = feature
        for j in range(i + 1, NUM_STAGES):
            h = self.run_stage(j, h)
        return self.embed(h)

    def stage_shapes(self, input_hw: tuple[int, int] = (112, 112)) -> list[tuple[int, int, int]]:
        """``(H, W, C)`` of each stage output for a given input size, by abstract evaluation."""
        x = jax.ShapeDtypeStruct((1, *input_hw, 3), jnp.float32)
        graphdef, state = nnx.split(self)

        def run(state, x):
            model = nnx.merge(graphdef, state)
            return model(x, return_stages=True)[1]

        shapes = jax.eval_shape(run, state, x)
        return [tuple(s.shape[1:]) for s in shapes]
