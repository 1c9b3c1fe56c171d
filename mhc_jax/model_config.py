"""The LM's configuration: shapes, the connection and its options, the kernels, remat
and scanning. ``ModelConfig`` validates every field on construction, naming the field,
its value and what is allowed (docs/spec.md for the connection math)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from mhc_jax import remat as remat_lib
from mhc_jax.connections.functional import MHC_INITS, MHC_VARIANTS, RESIDUAL_SHARDS
from mhc_jax.layers import ATTENTION_IMPLS
from pallas_kernels.mhc.backends import IMPLS

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
        default: the fused Mosaic GPU forward does not yet beat the two kernels it
        replaces (docs/benchmarks.md).
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
