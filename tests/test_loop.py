"""mhc_jax/loop.py: the loop's learning signal, kill and resume, non-finite guards, checkpoint
fallback, resume safety, logs and the end-of-run sample."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_helpers import final_params, read_jsonl, train_losses, write_config

from mhc_jax import config as config_lib
from mhc_jax import data as data_lib
from mhc_jax import loop, run_dir
from mhc_jax.optim import make_optimizer
from mhc_jax.train import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("connection, n", [("residual", 1), ("hc", 4), ("mhc", 4)])
def test_loop_lowers_validation_loss(tmp_path, data_dir, connection, n, micro_config):
    cfg = micro_config(num_steps=50, eval_every=50, checkpoint_every=50)
    cfg.model.connection, cfg.model.n = connection, n
    cfg.data.path = data_dir
    result = loop.train_and_evaluate(cfg, str(tmp_path))
    uniform = math.log(cfg.model.vocab_size)  # loss of the untrained model is ~ln(V)
    assert result["val_loss"] < uniform - 1.5, result
    assert result["steps"] == 50 and result["nonfinite_total"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_and_resume_is_bitwise_identical(tmp_path, data_dir, sig, micro_config, run_cli):
    cfg = micro_config(num_steps=40, eval_every=20, checkpoint_every=5, sample_tokens=0)
    cfg.data.path = data_dir
    config_file = tmp_path / "cfg.py"
    write_config(cfg, config_file)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_cli(f"--config={config_file}", f"--workdir={straight}")

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py")]
    proc = subprocess.Popen(
        [*cmd, f"--config={config_file}", f"--workdir={resumed}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = os.path.join(resumed, "metrics.jsonl")
    while time.time() < deadline:  # wait until training is past its first checkpoint
        if os.path.exists(metrics) and any(r["step"] >= 12 for r in read_jsonl(resumed)):
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, err[-3000:]
    last = max(train_losses(resumed))
    assert last < 40, "the run finished before it was stopped; make it longer"
    run_cli(f"--config={config_file}", f"--workdir={resumed}")

    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    (step_a, pa), (step_b, pb) = final_params(straight), final_params(resumed)
    assert step_a == step_b == 40
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_batches_are_skipped_then_stop(tmp_path, data_dir, monkeypatch, micro_config):
    real = data_lib.make_train_iterator

    class Poisoned:
        def __init__(self, it):
            self.it, self.count = it, 0

        def __next__(self):
            batch = next(self.it)
            self.count += 1
            if self.count in (3,) or self.count >= 8:  # one bad batch, then a run of them
                batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, s):
            self.it.set_state(s)

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
    cfg = micro_config(num_steps=30, max_nonfinite_streak=4)
    cfg.data.path = data_dir
    with pytest.raises(loop.NonFiniteError, match="4 consecutive non-finite updates at step 11"):
        loop.train_and_evaluate(cfg, str(tmp_path))
    records = [r for r in read_jsonl(str(tmp_path)) if r["split"] == "train"]
    by_step = {r["step"]: r for r in records}
    assert by_step[2]["nonfinite_total"] == 0 and by_step[3]["nonfinite_total"] == 1
    assert by_step[7]["nonfinite_total"] == 1 and math.isfinite(by_step[7]["loss"])


def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir, micro_config):
    cfg = micro_config(num_steps=12, checkpoint_every=6, sample_tokens=0)
    cfg.data.path = data_dir
    workdir = str(tmp_path)
    loop.train_and_evaluate(cfg, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "12", "state")
    damaged = 0
    for root, _, files in os.walk(state_dir):  # a torn write: every array file truncated
        for name in files:
            if "metadata" not in name.lower():
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
                damaged += 1
    assert damaged > 0
    cfg.training.num_steps = 14
    result = loop.train_and_evaluate(cfg, workdir)
    assert result["steps"] == 14
    resumed_steps = [r["step"] for r in read_jsonl(workdir) if r["split"] == "train"]
    assert resumed_steps[12:] == [7, 8, 9, 10, 11, 12, 13, 14]  # continued from step 6


# ------------------------------------------------------------------------- resume safety


def files_of(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_rerun_is_refused_reported_or_resumed_by_what_changed(
    tmp_path, data_dir, capsys, micro_config
):
    cfg = micro_config(num_steps=4, eval_every=4, checkpoint_every=4, sample_tokens=0)
    cfg.data.path = data_dir
    workdir = tmp_path / "run"
    first = loop.train_and_evaluate(cfg, str(workdir))
    before = files_of(workdir)

    # Finished: the logged results come back; nothing trains, samples or is written.
    capsys.readouterr()
    cfg.training.sample_tokens = 8
    again = loop.train_and_evaluate(cfg, str(workdir))
    assert "Already trained to step 4: steps=4, loss=" in capsys.readouterr().out
    keys = ("steps", "loss", "val_loss", "val_bits_per_byte", "nonfinite_total")
    assert again == {k: first[k] for k in keys}
    assert files_of(workdir) == before

    # Shapes or meaning changed: one error naming every such field, nothing written.
    bad = config_lib.config_from_json(cfg.to_json())
    bad.model.d_model, bad.optimizer.learning_rate, bad.training.num_steps = 64, 0.01, 6
    with pytest.raises(run_dir.ConfigMismatchError) as err:
        loop.train_and_evaluate(bad, str(workdir))
    message = str(err.value)
    assert "model.d_model: 32 in config.json, now 64" in message
    assert "optimizer.learning_rate: 0.003 in config.json, now 0.01" in message
    assert "num_steps:" not in message and "training.num_steps" in message  # allowed, listed
    assert files_of(workdir) == before

    shorter = config_lib.config_from_json(cfg.to_json())
    shorter.training.num_steps = 2
    with pytest.raises(ValueError, match=r"training.num_steps=2 is invalid.*step 4; must be >= 4"):
        loop.train_and_evaluate(shorter, str(workdir))

    # Allowed changes: resumes (resharded onto a data x fsdp mesh), config.json follows.
    longer = config_lib.config_from_json(cfg.to_json())
    longer.training.update(num_steps=6, eval_every=3, checkpoint_every=3, sample_tokens=0)
    fsdp = 2 if jax.device_count() >= 8 else 1  # resharded on 8-device hosts (CPU: fake ones)
    longer.sharding.update(data=-1, fsdp=fsdp)
    longer.logging.log_every = 2
    result = loop.train_and_evaluate(longer, str(workdir))
    assert result["steps"] == 6 and "sample" not in result
    assert [r["step"] for r in read_jsonl(workdir) if r["split"] == "train"] == [1, 2, 3, 4, 6]
    recorded = run_dir.recorded_config(workdir)
    assert recorded["training.num_steps"] == 6 and recorded["sharding.fsdp"] == fsdp


def test_resumable_fields_keep_the_train_state_and_old_configs_still_compare(
    tmp_path, micro_config
):
    defaults = run_dir.flat_config(config_lib.default_config())
    sections = {k.split(".")[0] for k in defaults}
    for field in run_dir.RESUMABLE_FIELDS:
        assert field in defaults or field.removesuffix(".*") in sections, field

    def abstract_state(cfg):
        tx = make_optimizer(config_lib.optimizer_config(cfg), cfg.training.num_steps)
        model_cfg = config_lib.model_config(cfg)
        state = jax.eval_shape(lambda: init_train_state(model_cfg, tx, 0, boxed=True))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        return treedef, [(path, x.shape, x.dtype) for path, x in leaves]

    base = abstract_state(micro_config())
    for field, value in [
        ("model.impl", "xla"),
        ("model.impl", "pallas_interpret"),
        ("model.attention", "xla"),
        ("model.residual_shard", "sequence"),
        ("optimizer.grad_accum_steps", 4),
    ]:
        assert run_dir.may_change(field)
        cfg = micro_config()
        cfg.update_from_flattened_dict({field: value})
        assert abstract_state(cfg) == base, field

    # An old config.json: a field since added takes its default, one since removed is ignored.
    cfg = micro_config()
    recorded = json.loads(cfg.to_json())
    del recorded["logging"]["progress"]
    recorded["training"]["removed_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    cfg.model.n = 2
    run_dir.check_resume(str(tmp_path), cfg)  # no checkpoint yet: any config may start over
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a committed step (local layout)
    cfg.model.n = 4
    cfg.logging.progress = True
    run_dir.check_resume(str(tmp_path), cfg)
    cfg.model.n = 2
    with pytest.raises(run_dir.ConfigMismatchError, match="model.n: 4 in config.json, now 2"):
        run_dir.check_resume(str(tmp_path), cfg)


@pytest.mark.parametrize("path", ["missing_dir", "empty_dir"])
def test_bad_data_path_names_the_field_and_creates_nothing(tmp_path, path, micro_config):
    (tmp_path / "empty_dir").mkdir()
    cfg = micro_config()
    cfg.data.path = str(tmp_path / path)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"data.path='.*{path}' is invalid .*: must be ''"):
        loop.train_and_evaluate(cfg, str(workdir))
    assert not workdir.exists()


def test_tensorboard_events_and_sample(tmp_path, data_dir, micro_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = micro_config()
    cfg.data.path = data_dir
    result = loop.train_and_evaluate(cfg, str(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in [
        "train/loss",
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_s",
        "train/step_time_s",
        "validation/loss",
        "validation/bits_per_byte",
        "diagnostics/amax/composite_forward_max",
        "diagnostics/amax/composite_backward_max",
        "diagnostics/amax/layer_forward_max",
        "diagnostics/h_res/row_err_max",
        "diagnostics/h_res/col_err_max",
        "diagnostics/h_pre/mean",
        "diagnostics/h_post/mean",
    ]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "diagnostics/h_res" in acc.Tags()["images"]
    with open(tmp_path / "diagnostics.jsonl") as f:
        profiles = [json.loads(line) for line in f]
    assert [p["step"] for p in profiles] == [6, 12]
    layers = 2 * cfg.model.num_blocks
    assert np.asarray(profiles[-1]["h_res"]).shape == (layers, cfg.model.n, cfg.model.n)
    assert len(profiles[-1]["composite_forward"]) == layers
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert (tmp_path / "sample.txt").read_text() == result["sample"]
    assert result["sample"].startswith("ROMEO:") and len(result["sample"]) > len("ROMEO:")
