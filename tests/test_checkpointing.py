"""Tests for mhc_jax.checkpointing: round trip, async, retention, corruption fallback."""

import functools
import gc
import glob
import logging
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mhc_jax.checkpointing import Checkpointer, CheckpointMismatchError, saved_steps

# A failed restore abandons orbax's other pending array reads; their "Exception ignored"
# reports on garbage collection are harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True, scope="module")
def _collect_abandoned_reads():
    yield
    gc.collect()  # while the filter above applies, not at interpreter exit


CONFIG = {"model": {"d_model": 8, "layers": 2}, "lr": 1e-3, "name": "tiny"}


@flax.struct.dataclass
class State:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@functools.partial(jax.jit, static_argnames="width")
def _make_state(seed: jax.Array, width: int) -> State:
    key = jax.random.key(seed)
    params = {
        "w": jax.random.normal(key, (8, width), jnp.float32),
        "b": jnp.arange(width, dtype=jnp.bfloat16) * seed,
    }
    tx = optax.adamw(1e-3)
    _, opt_state = tx.update(params, tx.init(params), params)
    return State(seed, params, opt_state, jax.random.fold_in(key, 7))


def make_state(seed: int, width: int = 4) -> State:
    """Params w (8, width) f32, b (width,) bf16; adamw state after one update; typed key."""
    return _make_state(jnp.asarray(seed, jnp.int32), width=width)


TARGET = jax.eval_shape(lambda: make_state(0))


def assert_states_equal(a: State, b: State) -> None:
    assert jax.dtypes.issubdtype(a.rng.dtype, jax.dtypes.prng_key)
    a, b = (s.replace(rng=jax.random.key_data(s.rng)) for s in (a, b))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save(ckpt: Checkpointer, step: int, metrics: dict | None = None, force: bool = False) -> bool:
    state = make_state(step)
    return ckpt.save(
        step, state, data_state={"pos": step}, config=CONFIG, metrics=metrics, force=force
    )


def step_dirs(directory) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_round_trip_is_bitwise_and_respects_shardings(tmp_path):
    sharded = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), PartitionSpec("data"))
    state = make_state(3)
    state = state.replace(params={**state.params, "w": jax.device_put(state.params["w"], sharded)})
    data_state = {"shard": 1, "positions": [3, 9], "name": "train"}
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.save(5, state, data_state=data_state, config=CONFIG, metrics={"val_loss": 2.5})
    ckpt.close()

    ckpt = Checkpointer(str(tmp_path))
    assert (ckpt.latest_step(), ckpt.all_steps()) == (5, [5])
    out = ckpt.restore(jax.eval_shape(lambda: state))
    assert out.step == 5
    assert_states_equal(out.state, state)
    assert out.state.params["w"].sharding == sharded
    assert (out.data_state, out.config, out.metrics) == (data_state, CONFIG, {"val_loss": 2.5})
    ckpt.close()


def test_async_save_then_wait(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=True)
    state = make_state(1)
    assert ckpt.save(1, state, data_state=None, config=CONFIG)
    jax.tree.map(lambda x: x.delete(), state)  # as buffer donation to the next step would
    ckpt.wait_until_finished()
    assert step_dirs(tmp_path) == [1]
    out = ckpt.restore(TARGET)
    assert (out.step, out.data_state, out.metrics) == (1, None, None)
    assert_states_equal(out.state, make_state(1))
    ckpt.close()


@pytest.mark.parametrize("mode,sign", [("min", 1.0), ("max", -1.0)])
def test_retention_keeps_last_and_best(tmp_path, mode, sign):
    def make():
        return Checkpointer(str(tmp_path), keep_last=2, keep_best=1, best_mode=mode)

    ckpt = make()
    losses = {1: 3.0, 2: 1.0, 3: 4.0, 5: 5.0, 6: 6.0}  # step 2 is best
    for step in range(1, 7):
        metrics = {"val_loss": sign * losses[step]} if step in losses else {"train_loss": 0.1}
        assert save(ckpt, step, metrics)
    ckpt.wait_until_finished()
    assert step_dirs(tmp_path) == [2, 5, 6]
    ckpt.close()

    ckpt = make()  # the ranking of old steps is reloaded from disk
    save(ckpt, 7, {"val_loss": sign * 7.0})
    save(ckpt, 8)
    ckpt.wait_until_finished()
    assert step_dirs(tmp_path) == [2, 7, 8]
    assert ckpt.restore(TARGET, step=2).metrics == {"val_loss": sign * 1.0}
    ckpt.close()


def delete_array_files(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files
    for name in files:
        os.remove(name)


def truncate_array_files(step_dir):
    for name in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)


def garble_state_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text("{garbage")


def garble_data_state(step_dir):
    (step_dir / "data_state" / "metadata").write_text("{garbage")


@pytest.mark.parametrize(
    "damage", [delete_array_files, truncate_array_files, garble_state_metadata, garble_data_state]
)
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, damage):
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, 1)
    save(ckpt, 2)
    ckpt.close()
    damage(tmp_path / "2")

    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mhc_jax.checkpointing"):
        out = ckpt.restore(TARGET)
    assert out.step == 1 and out.data_state == {"pos": 1}
    assert_states_equal(out.state, make_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.name == "mhc_jax.checkpointing"]
    assert len(warnings) == 1 and "step 2" in warnings[0]
    with pytest.raises(RuntimeError, match="step 2 .* failed to restore"):
        ckpt.restore(TARGET, step=2)  # an explicit step does not fall back

    # Training resumes at step 1 and reaches step 2 again: the bad copy is moved aside.
    assert save(ckpt, 2, force=True)
    ckpt.wait_until_finished()
    assert ckpt.restore(TARGET).step == 2
    moved = sorted(os.listdir(tmp_path / "unrestorable"))
    assert len(moved) == 2 and moved[0].startswith("2-") and moved[1] == "README.txt"
    ckpt.close()


def test_nothing_restorable_raises(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, 1)
    save(ckpt, 2)
    ckpt.close()
    delete_array_files(tmp_path / "1")
    garble_state_metadata(tmp_path / "2")
    with pytest.raises(
        RuntimeError, match="could be restored: checkpoint step 2 .*; checkpoint step 1 "
    ):
        Checkpointer(str(tmp_path)).restore(TARGET)


def test_unfinished_tmp_dir_is_ignored(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, 1)
    ckpt.close()
    # What a process killed while writing step 2 leaves: an un-renamed, partial directory.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", partial)
    os.remove(partial / "commit_success.txt")
    delete_array_files(partial)

    (tmp_path / "unrestorable" / "3-1").mkdir(parents=True)  # a quarantined step
    assert saved_steps(str(tmp_path)) == [1]
    ckpt = Checkpointer(str(tmp_path))
    assert (ckpt.latest_step(), ckpt.all_steps()) == (1, [1])
    assert ckpt.restore(TARGET).step == 1
    assert save(ckpt, 2)
    ckpt.wait_until_finished()
    out = ckpt.restore(TARGET)
    assert out.step == 2
    assert_states_equal(out.state, make_state(2))
    ckpt.close()


def test_no_checkpoint_returns_none(tmp_path):
    assert saved_steps(str(tmp_path / "empty")) == []
    assert not (tmp_path / "empty").exists()  # looking creates nothing
    ckpt = Checkpointer(str(tmp_path / "empty"))
    assert (ckpt.latest_step(), ckpt.all_steps()) == (None, [])
    assert ckpt.restore(TARGET) is None
    with pytest.raises(ValueError, match="step=3"):
        ckpt.restore(TARGET, step=3)


def test_restore_explicit_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    for step in (1, 2, 3):
        save(ckpt, step, {"val_loss": float(step)})
    out = ckpt.restore(TARGET, step=1)
    assert (out.step, out.data_state, out.metrics) == (1, {"pos": 1}, {"val_loss": 1.0})
    assert_states_equal(out.state, make_state(1))
    with pytest.raises(ValueError, match=r"step=9 .*\[1, 2, 3\]"):
        ckpt.restore(TARGET, step=9)
    ckpt.close()


def test_other_model_shape_raises_without_fallback(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, 1)
    save(ckpt, 2)
    ckpt.wait_until_finished()
    wider = jax.eval_shape(lambda: make_state(0, width=6))
    with caplog.at_level(logging.WARNING, logger="mhc_jax.checkpointing"):
        with pytest.raises(CheckpointMismatchError, match="step 2") as err:
            ckpt.restore(wider)
    assert "params/w: checkpoint shape (8, 4) vs expected (8, 6)" in str(err.value)
    assert not [r for r in caplog.records if r.name == "mhc_jax.checkpointing"]

    extra = TARGET.replace(params={**TARGET.params, "c": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(CheckpointMismatchError, match="missing from checkpoint: params/c"):
        ckpt.restore(extra)
    ckpt.close()


def test_save_validates_inputs_and_interval(tmp_path):
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=2)
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        ckpt.save(2, make_state(2), data_state=None, config={"f": object()})
    with pytest.raises(TypeError, match="metrics values"):
        ckpt.save(2, make_state(2), data_state=None, config=CONFIG, metrics={"val_loss": "x"})
    assert save(ckpt, 3)  # orbax always saves when there is no checkpoint yet
    assert not save(ckpt, 5)
    assert save(ckpt, 6)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()
