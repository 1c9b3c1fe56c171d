"""Train state, jitted train/eval steps and the pieces the training loop is built from.

The loop itself lives in ``mhc_jax.loop``; experiment scripts call
``mhc_jax.loop.train_and_evaluate(config, workdir)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mhc_jax import diagnostics
from mhc_jax import sharding as sharding_lib
from mhc_jax.model import LM, ModelConfig, init_params
from mhc_jax.optim import global_norm

LN2 = 0.6931471805599453


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is a typed PRNG key."""

    step: jax.Array  # () int32: updates applied
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_total: jax.Array  # () int32: updates skipped for non-finite loss/gradients
    nonfinite_streak: jax.Array  # () int32: consecutive skipped updates


def init_train_state(
    model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, *, boxed: bool = False
):
    """Fresh state: params from ``seed``, optimiser state, a data-independent RNG.

    With ``boxed=True`` parameters and the optimiser moments stay wrapped in
    Flax's ``LogicallyPartitioned`` boxes (for ``sharding.tree_shardings``).
    """
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_cfg, init_key, boxed=True)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(zero, params, tx.init(params), rng, zero, zero)
    return state if boxed else sharding_lib.strip_boxes(state)


def compiler_options(deterministic: bool) -> dict[str, bool] | None:
    """XLA options for a run's jitted computations (``jax.jit(..., compiler_options=)``).

    ``deterministic`` turns on XLA's run-to-run determinism on GPU: scatter-adds (the
    embedding gradient) use their deterministic algorithm, GEMMs no atomic split-K.
    The option is read by the GPU compiler only. Pair it with ``deterministic_model``.
    """
    return {"xla_gpu_deterministic_ops": True} if deterministic else None


def deterministic_model(model_cfg: ModelConfig, deterministic: bool) -> ModelConfig:
    """The model a run compiles with ``compiler_options(deterministic)``.

    Deterministic runs use XLA attention: "auto" resolves to "xla", and "cudnn" is a
    ValueError. XLA as shipped with JAX 0.11.2 fails at the first step (``IndexError:
    absl::container_internal::raw_hash_map<>::at``, measured on an H200) when the
    deterministic mode meets two identical cuDNN attention backward calls, i.e. any
    model with more than one layer (openxla/xla#46500). XLA attention materialises
    the (B, H, T, T) scores, so it needs more memory than cuDNN's at long sequences.
    """
    if not deterministic:
        return model_cfg
    if model_cfg.attention == "cudnn":
        raise ValueError(
            "model.attention='cudnn' is invalid with training.deterministic=True: XLA's "
            "deterministic mode fails on cuDNN attention's backward (openxla/xla#46500); "
            "use 'auto' (XLA attention when deterministic) or 'xla'"
        )
    return dataclasses.replace(model_cfg, attention="xla")


def weighted_cross_entropy(logits, targets, weights) -> tuple[jax.Array, jax.Array]:
    """Sum of per-token cross entropy (nats) times weights, and the sum of weights.

    Args:
      logits: (B, T, V) fp32; targets: (B, T) int32; weights: (B, T) fp32.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights), jnp.sum(weights)


def _loss_and_diagnostics(params, batch, model):
    logits, state = model.apply({"params": params}, batch["inputs"], mutable=["diagnostics"])
    loss_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    coeffs = diagnostics.collect_coefficients(state.get("diagnostics", {}))
    return loss_sum / jnp.maximum(weight_sum, 1.0), coeffs


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, accum_steps: int):
    """Returns ``step(state, batch) -> (state, metrics)`` (un-jitted; the loop jits it).

    ``batch`` holds (B, T) arrays; with ``accum_steps`` > 1 it is split into that
    many micro-batches whose gradients are averaged. A non-finite loss or gradient
    norm leaves params and optimiser state untouched and counts the skip.
    Metrics: loss, grad_norm, skipped flag/counters, diagnostics summary scalars
    and ``h_res`` (L, n, n) for heatmaps (absent for a residual model).
    """
    model = LM(model_cfg)
    grad_fn = jax.value_and_grad(_loss_and_diagnostics, has_aux=True)

    def step(state: TrainState, batch):
        if accum_steps == 1:
            (loss, coeffs), grads = grad_fn(state.params, batch, model)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                (loss, coeffs), grads = grad_fn(state.params, mb, model)
                return jax.tree.map(jnp.add, carry, grads), (loss, coeffs)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (losses, coeffs) = jax.lax.scan(accumulate, zeros, micro)
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            loss = jnp.mean(losses)
            coeffs = jax.tree.map(lambda c: jnp.mean(c, axis=0), coeffs)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Zeroed gradients keep a NaN out of the optimiser's arithmetic; the
        # resulting update is then discarded below.
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_total=state.nonfinite_total + skipped,
            nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "nonfinite_total": new_state.nonfinite_total,
            "nonfinite_streak": new_state.nonfinite_streak,
            **diagnostics.summary_stats(coeffs),
        }
        if coeffs:
            metrics["h_res"] = coeffs["h_res"]
        return new_state, metrics

    return step


def make_eval_step(model_cfg: ModelConfig):
    """Returns ``eval_step(params, batch) -> (loss_sum, weight_sum)`` (un-jitted)."""
    model = LM(model_cfg)

    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return weighted_cross_entropy(logits, batch["targets"], batch["weights"])

    return eval_step


def eval_metrics(
    loss_sum: float, weight_sum: float, tokens_per_byte: float = 1.0
) -> dict[str, float]:
    """Validation loss (nats/token) and bits per UTF-8 byte of the text: the loss per
    token times the validation split's tokens per byte (EOS tokens included, their loss
    charged to the text), comparable across tokenizers."""
    loss = loss_sum / max(weight_sum, 1.0)
    return {"loss": loss, "bits_per_byte": loss / LN2 * tokens_per_byte}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where arrays live: the mesh, the logical-axis rules and the shardings they give.

    Use ``with layout.activate():`` around tracing, so that the model's logical
    constraints and the mHC shard_map see the mesh and the rules.
    """

    mesh: Mesh
    rules: tuple
    residual_shard: str

    @classmethod
    def create(cls, mesh_cfg: sharding_lib.MeshConfig, model_cfg: ModelConfig, devices=None):
        mesh = sharding_lib.make_mesh(mesh_cfg, devices)
        rules = sharding_lib.logical_rules(model_cfg.residual_shard)
        return cls(mesh, rules, model_cfg.residual_shard)

    @contextlib.contextmanager
    def activate(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def batch(self) -> NamedSharding:
        return sharding_lib.batch_sharding(self.mesh, self.residual_shard)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self, abstract_boxed_state):
        """Shardings of the (unboxed) train state from its boxed abstract version."""
        return sharding_lib.tree_shardings(abstract_boxed_state, self.mesh, self.rules)

    def put_batch(self, local_batch: dict) -> dict:
        """Host-local numpy batch -> global jax arrays laid out as ``self.batch``."""
        return {
            k: jax.make_array_from_process_local_data(self.batch, v) for k, v in local_batch.items()
        }
