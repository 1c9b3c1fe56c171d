"""mhc-jax: residual, Hyper-Connection (HC) and Manifold-Constrained HC (mHC) language
models in JAX/Flax.

The public names below load on first use, so that ``import mhc_jax.paths`` (data
preparation workers, for one) does not import the whole training stack.

    import mhc_jax

    cfg = mhc_jax.ModelConfig(connection="mhc", n=4, num_blocks=2, d_model=64,
                              num_heads=2, d_ff=128)
    params = mhc_jax.init_params(cfg, jax.random.key(0))
    logits = mhc_jax.LM(cfg).apply({"params": params}, tokens)

The connection math, Sinkhorn and modules: ``mhc_jax.connections``; the kernels:
``pallas_kernels.mhc``; the math and conventions: docs/spec.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ModelConfig": "mhc_jax.model_config",
    "LM": "mhc_jax.model",
    "init_params": "mhc_jax.model",
    "count_params": "mhc_jax.model",
    "default_config": "mhc_jax.config",
    "load_config_file": "mhc_jax.config",
    "train_and_evaluate": "mhc_jax.loop",
    "load_run": "mhc_jax.run_dir",
    "generate": "mhc_jax.sampling",
    "collect_coefficients": "mhc_jax.diagnostics",
    "gain_profile": "mhc_jax.diagnostics",
    "load_deepseek_v4": "mhc_jax.interop.deepseek_v4",
}
_SUBPACKAGES = ("connections",)

__all__ = [
    "__version__",
    "LM",
    "ModelConfig",
    "collect_coefficients",
    "connections",
    "count_params",
    "default_config",
    "gain_profile",
    "generate",
    "init_params",
    "load_config_file",
    "load_deepseek_v4",
    "load_run",
    "train_and_evaluate",
]

if TYPE_CHECKING:
    from mhc_jax import connections
    from mhc_jax.config import default_config, load_config_file
    from mhc_jax.diagnostics import collect_coefficients, gain_profile
    from mhc_jax.interop.deepseek_v4 import load_deepseek_v4
    from mhc_jax.loop import train_and_evaluate
    from mhc_jax.model import LM, count_params, init_params
    from mhc_jax.model_config import ModelConfig
    from mhc_jax.run_dir import load_run
    from mhc_jax.sampling import generate


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"mhc_jax.{name}")
    else:
        raise AttributeError(f"module 'mhc_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
