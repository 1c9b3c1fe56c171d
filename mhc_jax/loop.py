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

import dataclasses
import functools
import json
import signal
import time
from collections.abc import Callable, Iterable

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from etils import epath

from mhc_jax import config as config_lib
from mhc_jax import data as data_lib
from mhc_jax import data_cache, paths, run_dir, tokenizers
from mhc_jax.checkpointing import Checkpointer
from mhc_jax.diagnostics import gain_profile, heatmap_image
from mhc_jax.logging import MetricsLogger
from mhc_jax.model import ModelConfig
from mhc_jax.optim import learning_rate_schedule, make_optimizer
from mhc_jax.preflight import preflight
from mhc_jax.sampling import generate, sample_prompt
from mhc_jax.train import (
    Layout,
    TrainState,
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
    start_time = time.time()
    with run.layout.activate():
        # Read-only checks first: a refused config or data source leaves the workdir as it was.
        run_dir.check_resume(workdir, config)
        data_cache.check_source(config.data.path)
        finished = run_dir.finished_results(workdir, config.training.num_steps)
        if finished is not None:
            if jax.process_index() == 0:
                _print_done(finished, f"Already trained to step {finished['steps']}")
            return finished
        session = _setup(config, paths.path(workdir), run.model, run.layout)
        preempted = _train(session)
        return _finish(session, preempted, time.time() - start_time)


@dataclasses.dataclass
class _Session:
    """What the loop works with, built by ``_setup`` once the run may go ahead."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    model_cfg: ModelConfig
    layout: Layout
    tok: tokenizers.Tokenizer
    train_iter: grain.DatasetIterator
    eval_batches: Iterable  # re-iterable validation batches (data.eval_batches)
    tokens_per_byte: float  # of the validation split: loss/ln 2 * this = bits per byte
    state: TrainState
    ckpt: Checkpointer
    train_step: Callable  # jitted (state, batch) -> (state, metrics)
    eval_step: Callable  # jitted (params, batch) -> (loss sum, weight sum)
    logger: MetricsLogger
    is_main: bool
    validation: dict | None = None  # the newest validation metrics
    last_train_loss: float = float("nan")


def _setup(config, workdir: epath.Path, model_cfg: ModelConfig, layout: Layout) -> _Session:
    """The data (prepared into the cache if needed), the train state (restored from the
    newest checkpoint if any), the jitted steps and the logger."""
    opt_cfg = config_lib.optimizer_config(config)
    t_cfg, d_cfg = config.training, config.data
    is_main = jax.process_index() == 0

    tok = tokenizers.load(d_cfg.tokenizer)
    cache_dir = d_cfg.cache_dir or str(workdir / "data")
    data_dir = data_cache.ensure_prepared(d_cfg.path, cache_dir, d_cfg.tokenizer, d_cfg.text_field)
    data_cache.check_tokenizer(data_dir, d_cfg.tokenizer_id)
    val_split = data_lib.read_meta(data_dir)["splits"]["validation"]
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = data_lib.make_train_iterator(
        data_dir,
        seq_len=d_cfg.seq_len,
        global_batch_size=d_cfg.batch_size,
        seed=d_cfg.seed,
        worker_count=d_cfg.worker_count,
        **shard,
    )
    eval_batches = data_lib.eval_batches(
        data_dir,
        seq_len=d_cfg.seq_len,
        batch_size=d_cfg.eval_batch_size,
        max_batches=d_cfg.eval_max_batches or None,
        **shard,
    )

    tx = make_optimizer(opt_cfg, t_cfg.num_steps)
    init = functools.partial(init_train_state, model_cfg, tx, t_cfg.seed)
    state_shardings = layout.state_shardings(jax.eval_shape(lambda: init(boxed=True)))
    state = jax.jit(init, out_shardings=state_shardings)()
    ckpt = Checkpointer(
        run_dir.checkpoint_dir(workdir),
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
    if is_main:
        run_dir.write_config(workdir, config)

    options = compiler_options(t_cfg.deterministic)
    train_step = jax.jit(
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
        tensorboard=config.logging.tensorboard,
        progress=config.logging.progress,
        initial_step=int(state.step),
    )
    return _Session(
        config=config,
        workdir=workdir,
        model_cfg=model_cfg,
        layout=layout,
        tok=tok,
        train_iter=train_iter,
        eval_batches=eval_batches,
        tokens_per_byte=val_split["num_tokens"] / max(val_split["num_bytes"], 1),
        state=state,
        ckpt=ckpt,
        train_step=train_step,
        eval_step=eval_step,
        logger=logger,
        is_main=is_main,
    )


class _StepMetrics:
    """Host-side handling of a finished step's metrics: the non-finite guard, the train
    log and the diagnostics. Called one step late, so that the host never waits on the
    step it just dispatched."""

    def __init__(self, session: _Session, start_step: int):
        self.t_cfg, self.l_cfg = session.config.training, session.config.logging
        self.logger = session.logger
        self.checkpoints = session.ckpt.directory
        self.schedule = learning_rate_schedule(
            config_lib.optimizer_config(session.config), self.t_cfg.num_steps
        )
        self.tokens_per_step = session.config.data.batch_size * session.config.data.seq_len
        self.last_log = (start_step, time.time())
        self.last_train_loss = float("nan")

    def __call__(self, step: int, metrics) -> None:
        t_cfg, l_cfg = self.t_cfg, self.l_cfg
        m = jax.device_get(metrics)
        self.last_train_loss = float(m["loss"])
        if int(m["nonfinite_streak"]) >= t_cfg.max_nonfinite_streak:
            raise NonFiniteError(
                f"{int(m['nonfinite_streak'])} consecutive non-finite updates at step {step} "
                f"(training.max_nonfinite_streak={t_cfg.max_nonfinite_streak}); the last good "
                f"checkpoint is in {self.checkpoints}"
            )
        if m["skipped"]:
            self.logger.write(f"step {step}: non-finite loss/gradients, update skipped")
        if step % l_cfg.log_every == 0 or step == t_cfg.num_steps:
            now = time.time()
            steps_done, elapsed = step - self.last_log[0], now - self.last_log[1]
            tok_s = steps_done * self.tokens_per_step / max(elapsed, 1e-9)
            scalars = {
                "loss": m["loss"],
                "grad_norm": m["grad_norm"],
                "learning_rate": self.schedule(step - 1),
                "tokens_per_s": tok_s,
                "step_time_s": elapsed / max(steps_done, 1),
                "nonfinite_total": m["nonfinite_total"],
            }
            self.logger.scalars(step, "train", scalars)
            self.logger.progress(step, loss=float(m["loss"]), tok_s=tok_s)
            self.last_log = (step, now)
        if "h_res" in m and (step % l_cfg.diagnostics_every == 0 or step == t_cfg.num_steps):
            self.logger.scalars(step, "diagnostics", {k: v for k, v in m.items() if "/" in k})
            self.logger.image(step, "diagnostics/h_res", heatmap_image(m["h_res"]))
            self.logger.profile(step, {**gain_profile(m["h_res"]), "h_res": m["h_res"]})


def _train(s: _Session) -> bool:
    """Steps from the state's step to training.num_steps, evaluating and saving on
    schedule; a SIGTERM/SIGINT saves and stops early. Returns whether it stopped early.
    Leaves the final state, train loss and validation metrics in ``s``."""
    t_cfg = s.config.training
    config_dict = json.loads(s.config.to_json_best_effort())
    handle = _StepMetrics(s, int(s.state.step))
    pending = None  # (step, metrics) of the last dispatched step, read one step late
    preempted = False
    with _StopRequest() as stop:
        for step in range(int(s.state.step) + 1, t_cfg.num_steps + 1):
            s.state, metrics = s.train_step(s.state, s.layout.put_batch(next(s.train_iter)))
            if pending is not None:
                handle(*pending)
            pending = (step, metrics)
            last = step == t_cfg.num_steps
            val = None
            if step % t_cfg.eval_every == 0 or last:
                val = _evaluate(
                    s.eval_step, s.state.params, s.eval_batches, s.layout, s.tokens_per_byte
                )
                s.logger.scalars(step, "validation", val)
                s.validation = val
            if step % t_cfg.checkpoint_every == 0 or last or stop.requested:
                # The logs then hold every step the checkpoint holds (a cloud workdir's
                # logs are uploaded at checkpoints: logging.py).
                handle(*pending)
                pending = None
                s.ckpt.save(
                    step,
                    s.state,
                    data_state=s.train_iter.get_state(),
                    config=config_dict,
                    metrics=None if val is None else {"val_loss": val["loss"]},
                    force=True,
                )
                s.logger.sync()
            if stop.requested:
                preempted = True
                s.logger.write(f"Stop requested: saved step {step}, exiting.")
                break
        if pending is not None:
            handle(*pending)
    s.last_train_loss = handle.last_train_loss
    s.logger.end_progress()
    s.ckpt.wait_until_finished()
    s.ckpt.close()
    return preempted


def _finish(s: _Session, preempted: bool, wall_s: float) -> dict[str, float]:
    """The result (see ``train_and_evaluate``), the end-of-run sample and the summary."""
    t_cfg = s.config.training
    result: dict = {}
    if s.validation is not None:
        result.update(
            val_loss=s.validation["loss"], val_bits_per_byte=s.validation["bits_per_byte"]
        )
    final_step = int(s.state.step)
    result.update(
        loss=s.last_train_loss,
        steps=final_step,
        wall_s=wall_s,
        nonfinite_total=int(s.state.nonfinite_total),
    )
    if preempted:
        result["preempted"] = 1
    elif t_cfg.sample_tokens > 0:
        sample = _sample(s.state.params, s.model_cfg, t_cfg, s.tok)
        s.logger.text(final_step, "sample", sample)
        result["sample"] = sample
        if s.is_main:
            (s.workdir / run_dir.SAMPLE_FILE).write_text(sample)
    s.logger.close()
    if s.is_main:
        _print_done(result)
        if "sample" in result:
            print(f"Sample:\n{result['sample']}", flush=True)
    return result
