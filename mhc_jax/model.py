"""Decoder-only transformer LM whose sub-layers are wrapped by residual, HC or mHC.

Data path (SPEC §1-§2):

    tokens (B, T) -> embedding (B, T, C) -> copy into n streams (B, T, n, C)
    -> N blocks; each block = [attention, MLP] sub-layers, each wrapped by its own
       connection (mapping -> pre -> F = norm + attention/MLP -> post-res)
    -> reduce streams (B, T, C) -> final RMSNorm -> LM head -> logits (B, T, V) fp32

``connection="residual"`` needs n = 1. With ``connection="hc"`` or ``"mhc"`` and
n = 1 the model keeps the connection's learned coefficients on one stream: HC's
static part is then exactly the residual and its dynamic part adds tanh gates;
mHC's h_res is exactly 1 and h_pre, h_post become learned sigmoid gates (its
residual init reads the stream with weight 1 - 0.01, SPEC §4 having no finite
logit for 1). This matches the HC paper's "n = 1" ablation row.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import remat as remat_lib
from mhc_jax.connections import modules as connection_modules
from mhc_jax.connections import partitioned
from mhc_jax.connections.functional import MHC_INITS, MHC_VARIANTS, RESIDUAL_SHARDS
from mhc_jax.connections.modules import (
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamHead,
)
from mhc_jax.layers import ATTENTION_IMPLS, CausalSelfAttention, RMSNorm, SwiGLU
from mhc_jax.sharding import strip_boxes
from pallas_kernels.mhc.backends import IMPLS
from pallas_kernels.mhc.context import Pending

CONNECTIONS = ("residual", "hc", "mhc")
STREAM_REDUCTIONS = ("sum", "mean", "learned")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and connection of the LM. Validated on construction.

    Attributes:
      vocab_size: tokens in the vocabulary (the byte tokenizer has 259).
      num_blocks: N transformer blocks; L = 2N connection layers.
      d_model: hidden size C.
      num_heads: attention heads; must divide d_model, head size even (RoPE).
      d_ff: SwiGLU hidden width.
      connection: "residual" | "hc" | "mhc".
      n: expansion rate (number of streams); 1 for "residual".
      hc_dynamic: HC's input-dependent part on (SPEC §3).
      hc_scale_init: init of HC's s_alpha, s_beta.
      sinkhorn_iters: Sinkhorn-Knopp iterations of mHC.
      mhc_norm_eps: epsilon of mHC's RMS over n*C.
      mhc_init: "residual" | "uniform" (SPEC §4).
      mhc_variant: the mHC coefficient math: "paper" (SPEC §4-5) | "deepseek_v4"
        (DeepSeek-V4's eps terms, for parity with its weights) | "lite" (mHC-lite:
        h_res a softmax-weighted mix of the n! permutation matrices, n <= 4); see
        ``pallas_kernels.mhc.variants``. The kernels take "paper" and "deepseek_v4";
        with "lite", impl "auto" runs the mapping on the XLA path, a kernel backend
        raises.
      mhc_alpha_init: init of mHC's alpha.
      stream_reduce: how the streams become one before the final norm: "sum" |
        "mean" | "learned" (DeepSeek-V4's input-dependent head,
        ``connections.stream_head``: per token, sigmoid gates from the RMS-scaled
        flattened streams). The streams start as n copies of the embedding (V4's
        expand as well).
      scale_output_init: divide the init std of the attention-out and MLP-down
        projections by sqrt(n) (HC's "by a factor of sqrt(n)": we shrink, since
        every stream receives the branch output and the streams are summed).
      tie_embeddings: LM head shares the embedding matrix.
      dtype: activation dtype ("bfloat16" for mixed precision).
      param_dtype: parameter (master weight) dtype.
      impl: mHC implementation: "auto" (per op, the platform's fastest kernels that
        take the input, else XLA) | "xla" | "pallas" (the platform's kernels, never
        XLA) | one kernel backend, "mosaic_gpu" (Hopper; 16-bit dtype, d_model a
        multiple of 64), "triton" or "tpu" | an "*_interpret" variant of those
        (``pallas_kernels.mhc.backends``).
      mhc_fuse_transitions: with the kernels, run each mHC layer's post-res fused with
        the next layer's mapping + pre (``api.transition``; unscanned models). Off by
        default: on an H200 the fused Mosaic GPU forward is slower than the two kernels
        it replaces (docs: BENCHMARKS.md).
      attention: "auto" (cuDNN flash attention on GPUs with 16-bit activations,
        else XLA) | "xla" | "cudnn" (see ``layers.attention_impl``).
      rope_base: RoPE frequency base.
      norm_eps: RMSNorm epsilon.
      init_std: std of the embedding and dense kernels.
      remat: rematerialisation policy: "none" | "full" | "save_dots" | "mhc_blocks"
        | "save_connections" (see remat.py).
      remat_layers: L_r of "mhc_blocks" in layers (0: round(sqrt(n L / (n + 2)))).
      scan_layers: run the blocks with ``nn.scan`` (one compiled body; faster
        compiles at depth). The scanned unit is a whole round-robin period of
        layers, so num_blocks must be a multiple of it (see ``scan_unit``).
      residual_shard: the streams' layout on a mesh's tensor axis: "hidden" (C)
        or "sequence" (T); see sharding.py.
    """

    vocab_size: int = 259
    num_blocks: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 384
    connection: str = "mhc"
    n: int = 4
    hc_dynamic: bool = True
    hc_scale_init: float = 0.01
    sinkhorn_iters: int = 20
    mhc_norm_eps: float = 1e-6
    mhc_init: str = "residual"
    mhc_variant: str = "paper"
    mhc_alpha_init: float = 0.01
    stream_reduce: str = "sum"
    scale_output_init: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    impl: str = "auto"
    mhc_fuse_transitions: bool = False
    attention: str = "auto"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    remat: str = "none"
    remat_layers: int = 0
    scan_layers: bool = False
    residual_shard: str = "hidden"

    def __post_init__(self):
        def fail(field, allowed):
            value = getattr(self, field)
            raise ValueError(f"ModelConfig.{field}={value!r} is invalid: must be {allowed}")

        for field in ("vocab_size", "num_blocks", "d_model", "num_heads", "d_ff", "n"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, "an integer >= 1")
        if self.sinkhorn_iters < 1 or not isinstance(self.sinkhorn_iters, int):
            fail("sinkhorn_iters", "an integer >= 1")
        if not isinstance(self.mhc_fuse_transitions, bool):
            fail("mhc_fuse_transitions", "True or False")
        choices = {
            "connection": CONNECTIONS,
            "mhc_init": MHC_INITS,
            "mhc_variant": MHC_VARIANTS,
            "stream_reduce": STREAM_REDUCTIONS,
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "impl": IMPLS,
            "attention": ATTENTION_IMPLS,
            "remat": remat_lib.POLICIES,
            "residual_shard": RESIDUAL_SHARDS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                fail(field, f"one of {allowed}")
        if self.d_model % self.num_heads:
            fail("num_heads", f"a divisor of d_model={self.d_model}")
        if (self.d_model // self.num_heads) % 2:
            fail("num_heads", f"such that d_model/num_heads is even (RoPE); d_model={self.d_model}")
        if self.attention == "cudnn" and (
            self.activation_dtype.itemsize != 2 or self.d_model // self.num_heads > 128
        ):
            fail("attention", "'xla' or 'auto' unless dtype is 16-bit and d_model/num_heads <= 128")
        if (
            self.impl.startswith("mosaic_gpu")
            and self.connection == "mhc"
            and (self.activation_dtype.itemsize != 2 or self.d_model % 64)
        ):
            fail(
                "impl",
                "'auto', 'xla' or 'pallas' unless dtype is 16-bit and d_model a multiple "
                "of 64 (the Mosaic GPU kernels)",
            )
        if self.connection == "mhc" and self.mhc_variant == "lite" and self.n > 4:
            fail("n", "<= 4 with mhc_variant='lite' (it mixes all n! permutation matrices)")
        if self.connection == "residual" and self.n != 1:
            fail("n", "1 when connection='residual' (use 'hc' or 'mhc' for n > 1)")
        for field in ("mhc_norm_eps", "norm_eps", "init_std", "rope_base"):
            if not getattr(self, field) > 0:
                fail(field, "> 0")
        if not isinstance(self.remat_layers, int) or self.remat_layers < 0:
            fail("remat_layers", "an integer >= 0 (0 = the paper's default)")
        if self.scan_layers and self.num_blocks % self.scan_unit:
            fail(
                "num_blocks",
                f"a multiple of {self.scan_unit} when scan_layers=True (the round-robin period "
                f"of n={self.n} and the remat group of {self.blocks_per_group} blocks)",
            )

    @property
    def num_layers(self) -> int:
        """L: connection layers (two sub-layers per block)."""
        return 2 * self.num_blocks

    @property
    def blocks_per_group(self) -> int:
        """Blocks per rematerialised group (1 unless remat="mhc_blocks")."""
        return remat_lib.blocks_per_group(self.remat, self.n, self.num_blocks, self.remat_layers)

    @property
    def scan_unit(self) -> int:
        """Blocks per scanned step: a multiple of both the remat group and the
        round-robin period (layer k reads stream k mod n: n // gcd(n, 2) blocks)."""
        return math.lcm(self.blocks_per_group, self.n // math.gcd(self.n, 2))

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def make_connection(config: ModelConfig, layer_index: int, name: str) -> nn.Module:
    """The connection module wrapping sub-layer ``layer_index``."""
    if config.connection == "residual":
        return Residual(name=name)
    if config.connection == "hc":
        return HyperConnection(
            layer_index=layer_index,
            dynamic=config.hc_dynamic,
            scale_init=config.hc_scale_init,
            norm_eps=config.norm_eps,
            name=name,
        )
    return ManifoldHyperConnection(
        layer_index=layer_index,
        num_iters=config.sinkhorn_iters,
        norm_eps=config.mhc_norm_eps,
        init=config.mhc_init,
        variant=config.mhc_variant,
        alpha_init=config.mhc_alpha_init,
        impl=config.impl,
        residual_shard=config.residual_shard,
        defer_post_res=defers_post_res(config),
        name=name,
    )


def defers_post_res(config: ModelConfig) -> bool:
    """Whether the mHC layers hand each other a ``Pending`` (``mhc_fuse_transitions``:
    the kernels' fused transition between layers; see
    ``connection_modules.defers_post_res``). Unscanned models only: under ``nn.scan`` a
    Pending carry fails Flax's check that no broadcast value depends on the scan body,
    so scanned stacks run post-res in each layer."""
    return (
        config.connection == "mhc"
        and config.mhc_fuse_transitions
        and config.mhc_variant != "lite"  # no kernels for lite: its mapping runs on XLA
        and not config.scan_layers
        and connection_modules.defers_post_res(config.impl, config.n)
    )


class Block(nn.Module):
    """Attention and MLP sub-layers, each wrapped by its connection: (B, T, n, C) -> same."""

    config: ModelConfig
    index: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype)
        out_std = cfg.init_std / (math.sqrt(cfg.n) if cfg.scale_output_init else 1.0)
        mlp_kw = dict(init_std=cfg.init_std, out_init_std=out_std, **kw)
        attn_norm = RMSNorm(cfg.norm_eps, name="attn_norm", **kw)
        attn = CausalSelfAttention(
            cfg.num_heads, cfg.attention, cfg.rope_base, name="attn", **mlp_kw
        )
        mlp_norm = RMSNorm(cfg.norm_eps, name="mlp_norm", **kw)
        mlp = SwiGLU(cfg.d_ff, name="mlp", **mlp_kw)
        x = make_connection(cfg, 2 * self.index, "attn_conn")(x, lambda h: attn(attn_norm(h)))
        return make_connection(cfg, 2 * self.index + 1, "mlp_conn")(x, lambda h: mlp(mlp_norm(h)))


STREAM_AXES = ("batch", "seq", "streams", "act_embed")


def _constrain(x: jax.Array | Pending) -> jax.Array | Pending:
    """The streams' logical sharding, on x or on a Pending's input streams."""
    if isinstance(x, Pending):
        ctx = x.ctx._replace(streams=nn.with_logical_constraint(x.ctx.streams, STREAM_AXES))
        return x._replace(ctx=ctx)
    return nn.with_logical_constraint(x, STREAM_AXES)


class BlockGroup(nn.Module):
    """``size`` consecutive blocks starting at ``first``: (B, T, n, C) -> same.

    The unit of rematerialisation and of ``nn.scan``; the signature
    ``(x, _) -> (x, None)`` is the one ``nn.scan`` needs.
    """

    config: ModelConfig
    first: int
    size: int
    remat_each_block: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        block_cls = Block
        if self.remat_each_block:
            block_cls = nn.remat(Block, policy=remat_lib.checkpoint_policy(self.config.remat))
        for j in range(self.first, self.first + self.size):
            x = _constrain(block_cls(self.config, j, name=f"block_{j}")(x))
        return x, None


def run_blocks(config: ModelConfig, x: jax.Array, initializing: bool = False) -> jax.Array:
    """All blocks, grouped for rematerialisation and optionally scanned (call from a
    compact method: the groups become submodules of the caller).

    With the kernels' fused transitions (``defers_post_res``) the blocks carry a
    ``Pending`` from the first mHC layer on, and the last layer's post-res runs here."""
    per_group = config.blocks_per_group
    group_remat = config.remat != "none" and per_group > 1
    policy = remat_lib.checkpoint_policy(config.remat)
    remat_blocks = config.remat != "none" and not group_remat
    group_cls = (
        nn.remat(BlockGroup, policy=policy, prevent_cse=not config.scan_layers)
        if group_remat
        else BlockGroup
    )
    if config.scan_layers:
        unit = config.scan_unit
        scanned = nn.scan(
            group_cls,
            variable_axes={"params": 0, "diagnostics": 0, "intermediates": 0, "cache": 0},
            split_rngs={"params": True},
            length=config.num_blocks // unit,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(config, 0, unit, remat_blocks, name="scan")(x, None)
    else:
        for g, first in enumerate(range(0, config.num_blocks, per_group)):
            size = min(per_group, config.num_blocks - first)
            x, _ = group_cls(config, first, size, remat_blocks, name=f"group_{g}")(x)
    if isinstance(x, Pending):
        impl = "xla" if initializing else config.impl
        x = partitioned.post_res(
            *x, impl=impl, residual_shard=config.residual_shard, on_mesh=not initializing
        )
    return x


class LM(nn.Module):
    """The language model: tokens (B, T) int32 -> logits (B, T, vocab_size) fp32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("vocab", "embed")
            ),
            dtype=cfg.activation_dtype,
            param_dtype=cfg.weight_dtype,
            name="embed",
        )
        h = embed(tokens)
        x = jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], cfg.n, cfg.d_model))
        x = run_blocks(cfg, nn.with_logical_constraint(x, STREAM_AXES), self.is_initializing())
        h = self.reduce_streams(x)
        h = RMSNorm(cfg.norm_eps, cfg.activation_dtype, cfg.weight_dtype, name="final_norm")(h)
        if cfg.tie_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), ("embed", "vocab")
                ),
                dtype=cfg.activation_dtype,
                param_dtype=cfg.weight_dtype,
                name="lm_head",
            )(h)
        return logits.astype(jnp.float32)

    def reduce_streams(self, x: jax.Array) -> jax.Array:
        """(B, T, n, C) -> (B, T, C) by the configured stream reduction."""
        mode = self.config.stream_reduce
        if mode == "sum":
            return jnp.sum(x, axis=-2, dtype=x.dtype)
        if mode == "mean":
            return jnp.mean(x, axis=-2, dtype=x.dtype)
        cfg = self.config
        return StreamHead(cfg.mhc_norm_eps, cfg.mhc_alpha_init, name="stream_head")(x)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Initial parameters of ``LM(config)`` (a pytree of ``param_dtype`` arrays)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return strip_boxes(LM(config).init(rng, tokens)["params"])


def count_params(params) -> dict[str, int]:
    """Parameter counts: ``total`` and ``connections`` (connection modules + stream head)."""
    total, conn = 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", str(k)) for k in path]
        total += leaf.size
        if any(k.endswith("_conn") or k.startswith("stream_head") for k in keys):
            conn += leaf.size
    return {"total": total, "connections": conn}
