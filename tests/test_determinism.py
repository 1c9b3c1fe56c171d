"""``training.deterministic``: two runs from one seed give bitwise-equal losses and parameters.

Run natively on a GPU, where XLA's default scatter-add (the embedding gradient)
accumulates with atomics in no fixed order. CPU runs are
deterministic without the switch (``test_loop``'s kill-and-resume test compares
runs bitwise).
"""

import jax
import numpy as np
import pytest
from run_helpers import final_params, train_losses

from mhc_jax import config as config_lib
from mhc_jax import loop, preflight
from mhc_jax.train import compiler_options, deterministic_model


def test_the_switch_reaches_the_compiled_steps(tmp_path, monkeypatch):
    """The loop compiles its train and eval steps with the switch's XLA options."""
    jit, options = jax.jit, []

    def recording_jit(fn, **kwargs):
        options.append(kwargs.get("compiler_options"))
        return jit(fn, **kwargs)

    monkeypatch.setattr(loop.jax, "jit", recording_jit)
    cfg = _config()
    cfg.model.update(num_blocks=1, dtype="float32")
    cfg.training.update(num_steps=1, eval_every=1, checkpoint_every=1)
    cfg.data.cache_dir = str(tmp_path / "data")
    loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    want = {"xla_gpu_deterministic_ops": True}
    assert compiler_options(True) == want and compiler_options(False) is None
    assert options.count(want) == 2, options  # the train step and the eval step
    assert all(o in (None, want) for o in options), options


def test_deterministic_runs_use_xla_attention(cpu_devices):
    """cuDNN attention's backward breaks XLA's deterministic mode (openxla/xla#46500)."""
    cfg = _config()
    assert preflight.preflight(cfg, cpu_devices[:1]).model.attention == "xla"
    cfg.training.deterministic = False
    assert preflight.preflight(cfg, cpu_devices[:1]).model.attention == "auto"
    model = config_lib.model_config(cfg)
    assert deterministic_model(model, False) is model
    cfg.training.deterministic, cfg.model.attention = True, "cudnn"
    with pytest.raises(ValueError, match=r"model.attention='cudnn' is invalid with training"):
        preflight.preflight(cfg, cpu_devices[:1])


def _config():
    cfg = config_lib.default_config()
    m = cfg.model
    # bf16 and head size 32: cuDNN attention on a GPU unless deterministic; n = 4: the
    # Pallas kernels.
    m.num_blocks, m.d_model, m.num_heads, m.d_ff, m.dtype = 2, 64, 2, 128, "bfloat16"
    cfg.data.seq_len, cfg.data.batch_size = 64, 8
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 8, 2
    cfg.training.update(
        num_steps=20, eval_every=20, checkpoint_every=20, sample_tokens=0, deterministic=True
    )
    cfg.logging.update(log_every=1, diagnostics_every=20, progress=False, tensorboard=False)
    return cfg


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="checks XLA's GPU deterministic mode; CPU runs are deterministic without it",
)
def test_two_deterministic_runs_are_bitwise_equal(tmp_path):
    data = str(tmp_path / "data")
    runs = []
    for name in ("a", "b"):
        cfg = _config()
        cfg.data.cache_dir = data
        loop.train_and_evaluate(cfg, str(tmp_path / name))
        runs.append((train_losses(tmp_path / name), *final_params(str(tmp_path / name))))
    (losses_a, step_a, params_a), (losses_b, step_b, params_b) = runs
    assert step_a == step_b == 20 and len(losses_a) == 20
    assert losses_a == losses_b
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params_a), jax.tree.leaves(params_b)
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
