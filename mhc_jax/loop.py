"""The training loop: data -> jitted steps -> evaluation, checkpoints, logs, a sample.

``train_and_evaluate(config, workdir)`` resumes from the newest good checkpoint
in ``workdir/checkpoints`` (params, optimiser state, RNG, step and the data
iterator's position), so re-running the same command continues a run, and re-running
a finished run reports its results. A config that changes fields a resumed run must
keep (run_dir.py) stops before anything is written. SIGTERM or SIGINT finishes the
current step, saves and returns normally. ``workdir`` and ``data.path`` may be local
or gs:// (paths.py).
"""

from __future__ import annotations

import functools
import json
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from mhc_jax import config as config_lib
from mhc_jax import data as data_lib
from mhc_jax import data_cache, paths, run_dir, tokenizers
from mhc_jax.checkpointing import Checkpointer
from mhc_jax.diagnostics import gain_profile, heatmap_image
from mhc_jax.logging import MetricsLogger
from mhc_jax.optim import learning_rate_schedule, make_optimizer
from mhc_jax.preflight import preflight
from mhc_jax.sampling import generate
from mhc_jax.train import (
    Layout,
    compiler_options,
    eval_metrics,
    init_train_state,
    make_eval_step,
    make_train_step,
)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates."""


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _evaluate(eval_step, params, batches, layout, tokens_per_byte) -> dict[str, float]:
    loss_sum = weight_sum = 0.0
    for batch in batches:
        loss, weight = eval_step(params, layout.put_batch(batch))
        loss_sum += float(loss)
        weight_sum += float(weight)
    return eval_metrics(loss_sum, weight_sum, tokens_per_byte)


def sample_prompt(tok, text: str) -> jax.Array:
    """(1, P) ids starting a sample: the byte tokenizer's BOS then the text's bytes; for
    the others the text's tokens after an EOS (a document boundary, as in training)."""
    if tok.kind == "byte":
        return jnp.asarray(tok.encode(text, add_bos=True)[None, :])
    return jnp.asarray(np.concatenate([[tok.eos_id], tok.encode(text)]).astype(np.int32)[None])


def _sample(params, model_cfg, t_cfg, tok) -> str:
    prompt = sample_prompt(tok, t_cfg.sample_prompt)
    # One sequence cannot be split over the mesh: sample outside it (XLA places
    # the computation from the sharded parameters).
    with jax.set_mesh(None), nn.logical_axis_rules(()):
        out = generate(
            params,
            model_cfg,
            prompt,
            t_cfg.sample_tokens,
            rng=jax.random.key(t_cfg.seed + 1),
            temperature=t_cfg.sample_temperature,
            top_k=t_cfg.sample_top_k,
        )
    return tok.decode(np.asarray(out[0]))


def load_run(workdir: str, step: int | None = None):
    """(ModelConfig, params, step) of a training run's checkpoint (newest by default);
    ``workdir`` local or gs://."""
    path = paths.path(workdir) / run_dir.CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is --workdir a training run directory?")
    cfg = config_lib.config_from_json(path.read_text())
    model_cfg = config_lib.model_config(cfg)
    tx = make_optimizer(config_lib.optimizer_config(cfg), cfg.training.num_steps)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, tx, cfg.training.seed))
    ckpt_dir = paths.path(workdir) / "checkpoints"
    restored = Checkpointer(ckpt_dir).restore(abstract, step=step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    return model_cfg, restored.state.params, restored.step


def run_tokenizer(workdir: str):
    """The tokenizer a training run recorded (``data.tokenizer``), checked against the
    identity it recorded (``data.tokenizer_id``).

    Raises:
      ValueError: the tokenizer file changed since the run (both identities named).
    """
    cfg = config_lib.config_from_json((paths.path(workdir) / run_dir.CONFIG_FILE).read_text())
    tok = tokenizers.load(cfg.data.tokenizer)
    now = tokenizers.identity_string(tok.identity)
    if now != cfg.data.tokenizer_id:
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r} is now {now}, but the run in {workdir} "
            f"was trained with {cfg.data.tokenizer_id}: the tokenizer file changed"
        )
    return tok


def _print_done(result: dict, prefix: str = "Done") -> None:
    summary = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()
        if k != "sample"
    )
    print(f"{prefix}: {summary}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Parameters and optimiser state are laid out on the mesh of ``config.sharding``
    by their logical axes; batches are split over ``data`` x ``fsdp``.

    Returns:
      The final metrics: train ``loss``, ``val_loss``, ``val_bits_per_byte``,
      ``steps``, ``wall_s``, ``nonfinite_total``, a ``sample`` and, if stopped by a
      signal, ``preempted``; for a run that had finished already, those it logged
      (``run_dir.finished_results``).
    """
    run = preflight(config)
    with run.layout.activate():
        return _train_and_evaluate(config, workdir, run.model, run.layout)


def _train_and_evaluate(config, workdir, model_cfg, layout: Layout) -> dict[str, float]:
    start_time = time.time()
    workdir = paths.path(workdir)
    opt_cfg = config_lib.optimizer_config(config)
    t_cfg, d_cfg, l_cfg = config.training, config.data, config.logging
    is_main = jax.process_index() == 0
    # Read-only checks first: a refused config or data source leaves the workdir as it was.
    run_dir.check_resume(workdir, config)
    data_cache.check_source(d_cfg.path)
    finished = run_dir.finished_results(workdir, t_cfg.num_steps)
    if finished is not None:
        if is_main:
            _print_done(finished, f"Already trained to step {finished['steps']}")
        return finished

    tok = tokenizers.load(d_cfg.tokenizer)
    cache_dir = d_cfg.cache_dir or str(workdir / "data")
    data_dir = data_cache.ensure_prepared(d_cfg.path, cache_dir, d_cfg.tokenizer, d_cfg.text_field)
    data_cache.check_tokenizer(data_dir, d_cfg.tokenizer_id)
    val_split = data_lib.read_meta(data_dir)["splits"]["validation"]
    tokens_per_byte = val_split["num_tokens"] / max(val_split["num_bytes"], 1)
    train_iter = data_lib.make_train_iterator(
        data_dir,
        seq_len=d_cfg.seq_len,
        global_batch_size=d_cfg.batch_size,
        seed=d_cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=d_cfg.worker_count,
    )
    eval_batches = data_lib.eval_batches(
        data_dir,
        seq_len=d_cfg.seq_len,
        batch_size=d_cfg.eval_batch_size,
        max_batches=d_cfg.eval_max_batches or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    tx = make_optimizer(opt_cfg, t_cfg.num_steps)
    schedule = learning_rate_schedule(opt_cfg, t_cfg.num_steps)
    init = functools.partial(init_train_state, model_cfg, tx, t_cfg.seed)
    state_shardings = layout.state_shardings(jax.eval_shape(lambda: init(boxed=True)))
    state = jax.jit(init, out_shardings=state_shardings)()
    ckpt_dir = workdir / "checkpoints"
    ckpt = Checkpointer(
        ckpt_dir,
        keep_last=t_cfg.keep_last,
        keep_best=t_cfg.keep_best,
        best_metric="val_loss",
        async_save=t_cfg.async_checkpointing,
    )
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored.state
        if restored.data_state is not None:
            train_iter.set_state(restored.data_state)
        absl_logging.warning("Resumed from step %d of %s", restored.step, workdir)
    start_step = int(state.step)
    if is_main:
        run_dir.write_config(workdir, config)

    options = compiler_options(t_cfg.deterministic)
    step_fn = jax.jit(
        make_train_step(model_cfg, tx, opt_cfg.grad_accum_steps),
        in_shardings=(state_shardings, layout.batch),
        out_shardings=(state_shardings, layout.replicated),
        donate_argnums=(0,),
        compiler_options=options,
    )
    eval_step = jax.jit(
        make_eval_step(model_cfg),
        in_shardings=(state_shardings.params, layout.batch),
        out_shardings=layout.replicated,
        compiler_options=options,
    )
    logger = MetricsLogger(
        str(workdir),
        enabled=is_main,
        total_steps=t_cfg.num_steps,
        tensorboard=l_cfg.tensorboard,
        progress=l_cfg.progress,
        initial_step=start_step,
    )
    tokens_per_step = d_cfg.batch_size * d_cfg.seq_len
    config_dict = json.loads(config.to_json_best_effort())
    result: dict[str, float] = {}
    pending = None  # (step, metrics) of the last dispatched step, read one step late
    last_log = (start_step, time.time())
    last_train_loss = float("nan")

    def process(step: int, metrics) -> None:
        """Host-side handling of a finished step's metrics."""
        nonlocal last_log, last_train_loss
        m = jax.device_get(metrics)
        last_train_loss = float(m["loss"])
        if int(m["nonfinite_streak"]) >= t_cfg.max_nonfinite_streak:
            raise NonFiniteError(
                f"{int(m['nonfinite_streak'])} consecutive non-finite updates at step {step} "
                f"(training.max_nonfinite_streak={t_cfg.max_nonfinite_streak}); the last good "
                f"checkpoint is in {ckpt_dir}"
            )
        if m["skipped"]:
            logger.write(f"step {step}: non-finite loss/gradients, update skipped")
        if step % l_cfg.log_every == 0 or step == t_cfg.num_steps:
            now = time.time()
            steps_done, elapsed = step - last_log[0], now - last_log[1]
            tok_s = steps_done * tokens_per_step / max(elapsed, 1e-9)
            scalars = {
                "loss": m["loss"],
                "grad_norm": m["grad_norm"],
                "learning_rate": schedule(step - 1),
                "tokens_per_s": tok_s,
                "step_time_s": elapsed / max(steps_done, 1),
                "nonfinite_total": m["nonfinite_total"],
            }
            logger.scalars(step, "train", scalars)
            logger.progress(step, loss=float(m["loss"]), tok_s=tok_s)
            last_log = (step, now)
        if "h_res" in m and (step % l_cfg.diagnostics_every == 0 or step == t_cfg.num_steps):
            stats = {k: v for k, v in m.items() if "/" in k}
            logger.scalars(step, "diagnostics", stats)
            logger.image(step, "diagnostics/h_res", heatmap_image(m["h_res"]))
            logger.profile(step, {**gain_profile(m["h_res"]), "h_res": m["h_res"]})

    preempted = False
    with _StopRequest() as stop:
        for step in range(start_step + 1, t_cfg.num_steps + 1):
            batch = layout.put_batch(next(train_iter))
            state, metrics = step_fn(state, batch)
            if pending is not None:
                process(*pending)
            pending = (step, metrics)
            last = step == t_cfg.num_steps
            val = None
            if step % t_cfg.eval_every == 0 or last:
                val = _evaluate(eval_step, state.params, eval_batches, layout, tokens_per_byte)
                logger.scalars(step, "validation", val)
                result.update(val_loss=val["loss"], val_bits_per_byte=val["bits_per_byte"])
            if step % t_cfg.checkpoint_every == 0 or last or stop.requested:
                # The logs then hold every step the checkpoint holds (a cloud workdir's
                # logs are uploaded at checkpoints: logging.py).
                process(*pending)
                pending = None
                ckpt.save(
                    step,
                    state,
                    data_state=train_iter.get_state(),
                    config=config_dict,
                    metrics=None if val is None else {"val_loss": val["loss"]},
                    force=True,
                )
                logger.sync()
            if stop.requested:
                preempted = True
                logger.write(f"Stop requested: saved step {step}, exiting.")
                break
        if pending is not None:
            process(*pending)
    logger.end_progress()
    ckpt.wait_until_finished()
    ckpt.close()

    final_step = int(state.step)
    result.update(
        loss=last_train_loss,
        steps=final_step,
        wall_s=time.time() - start_time,
        nonfinite_total=int(state.nonfinite_total),
    )
    if preempted:
        result["preempted"] = 1
    elif t_cfg.sample_tokens > 0:
        sample = _sample(state.params, model_cfg, t_cfg, tok)
        logger.text(final_step, "sample", sample)
        result["sample"] = sample
        if is_main:
            (workdir / run_dir.SAMPLE_FILE).write_text(sample)
    logger.close()
    if is_main:
        _print_done(result)
        if "sample" in result:
            print(f"Sample:\n{result['sample']}", flush=True)
    return result
