"""AdamW with warmup + cosine or step decay, global-norm clipping and a decay mask.

Weight decay applies to matrices only: dense kernels, embeddings, mHC's phi and
HC's dynamic projections; not to norm scales, biases, alphas, gates or HC's
static coefficients (b_pre, b_post and the (n, n) b_res, SPEC §3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "step", "constant")
NO_DECAY_MATRICES = ("b_res",)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser settings (SPEC §9 defaults: betas 0.9/0.95, weight decay 0.1).

    Attributes:
      learning_rate: peak learning rate.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay on matrices.
      warmup_steps: linear warmup from 0.
      schedule: "cosine" (to min_lr_ratio * peak), "step" (DeepSeek-style: multiply
        by each of step_factors at the fractions step_boundaries of training) or
        "constant".
      min_lr_ratio: final/peak learning rate of the cosine schedule.
      step_boundaries, step_factors: the step schedule.
      clip_norm: global gradient-norm clip (0 disables).
      grad_accum_steps: micro-batches per update.
    """

    learning_rate: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    step_boundaries: tuple[float, ...] = (0.8, 0.9)
    step_factors: tuple[float, ...] = (0.316, 0.316)
    clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        def fail(field, allowed):
            raise ValueError(
                f"optimizer.{field}={getattr(self, field)!r} is invalid: must be {allowed}"
            )

        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {SCHEDULES}")
        if not self.learning_rate > 0:
            fail("learning_rate", "> 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            fail("b1" if not 0 <= self.b1 < 1 else "b2", "in [0, 1)")
        for field in ("weight_decay", "clip_norm", "warmup_steps"):
            if getattr(self, field) < 0:
                fail(field, ">= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "in [0, 1]")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            fail("grad_accum_steps", "an integer >= 1")
        if len(self.step_boundaries) != len(self.step_factors):
            fail("step_factors", f"as long as step_boundaries={self.step_boundaries}")
        if any(not 0 < b < 1 for b in self.step_boundaries):
            fail("step_boundaries", "fractions in (0, 1)")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Step -> learning rate."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "step":
        boundaries = {
            max(int(b * total_steps) - cfg.warmup_steps, 1): f
            for b, f in zip(cfg.step_boundaries, cfg.step_factors)
        }
        decay = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params) -> dict:
    """True for leaves that get weight decay: arrays with ndim >= 2 except HC's b_res."""

    def is_decayed(path, leaf):
        # the last dict key names the parameter (boxed params add a ``.value`` step)
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return leaf.ndim >= 2 and name not in NO_DECAY_MATRICES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (optional) then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in fp32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
