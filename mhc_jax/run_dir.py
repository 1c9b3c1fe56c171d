"""A run directory: its recorded config, what may change on resume, a finished run's
results, and a run's checkpoint and tokenizer for sampling.

``<workdir>/config.json`` records the config of the run whose checkpoints the workdir
holds. Re-running the workdir resumes that run only if the new config differs from the
recorded one in ``RESUMABLE_FIELDS`` alone: fields that change neither the shapes nor the
meaning of the saved state (parameters, optimiser state, RNG, the data iterator's
position in the training data). Any other difference stops the run before anything is
written, with one error naming every such field and both of its values.
"""

from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath

from mhc_jax import config as config_lib
from mhc_jax import paths, tokenizers
from mhc_jax.checkpointing import Checkpointer, saved_steps
from mhc_jax.logging import METRICS_FILE, read_jsonl
from mhc_jax.model import ModelConfig
from mhc_jax.optim import make_optimizer
from mhc_jax.train import init_train_state

CONFIG_FILE = "config.json"
SAMPLE_FILE = "sample.txt"


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    """Where a run keeps its checkpoints: ``<workdir>/checkpoints``."""
    return paths.path(workdir) / "checkpoints"


# The only fields a resumed run may change ("section.*": every field of the section).
RESUMABLE_FIELDS = (
    # How long to train (the learning-rate schedule stretches to the new length; it may
    # not end before the newest checkpoint) and when to evaluate, save, keep and sample.
    "training.num_steps",
    "training.eval_every",
    "training.checkpoint_every",
    "training.keep_last",
    "training.keep_best",
    "training.async_checkpointing",
    "training.max_nonfinite_streak",
    "training.sample_tokens",
    "training.sample_prompt",
    "training.sample_temperature",
    "training.sample_top_k",
    # XLA's deterministic mode: how the same steps are compiled, not what they compute.
    "training.deterministic",
    # Where prepared data is cached and how much validation data is read. (Not
    # data.worker_count: the data iterator's saved position has another form with worker
    # processes, and grain restores it wrongly or not at all across a change.)
    "data.cache_dir",
    # Where the tokenizer file is: data.tokenizer_id (its hash) must stay the same.
    "data.tokenizer",
    "data.eval_batch_size",
    "data.eval_max_batches",
    # How the same computation is laid out and run: checkpoints are resharded onto the new
    # mesh on restore; kernels or XLA, attention backend, the streams' layout and the split
    # of a batch into micro-batches leave the parameters and the update the same.
    "sharding.*",
    "model.impl",
    "model.attention",
    "model.residual_shard",
    "optimizer.grad_accum_steps",
    "logging.*",
)


class ConfigMismatchError(ValueError):
    """The new config changes fields of a workdir's run that a resumed run must keep."""


def may_change(field: str) -> bool:
    """Whether ``field`` ("section.name") may differ from the recorded config on resume."""
    return field in RESUMABLE_FIELDS or f"{field.split('.')[0]}.*" in RESUMABLE_FIELDS


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flat_config(config: ml_collections.ConfigDict) -> dict[str, object]:
    """Every field of ``config`` as "section.name" -> its JSON value (tuples as lists)."""
    return _flatten(json.loads(config.to_json_best_effort()))


def recorded_config(workdir: str | epath.Path) -> dict[str, object] | None:
    """The flattened config.json of ``workdir`` (None if it has none).

    Fields added to the code since it was written take their defaults (what that run
    used); fields the code no longer has are dropped.
    """
    file = paths.path(workdir) / CONFIG_FILE
    if not file.exists():
        return None
    recorded = _flatten(json.loads(file.read_text()))
    defaults = flat_config(config_lib.default_config())
    return {k: recorded.get(k, v) for k, v in defaults.items()}


def check_resume(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Checks that ``config`` may resume the run recorded in ``workdir`` (reads only).

    Raises:
      ConfigMismatchError: naming each changed field outside ``RESUMABLE_FIELDS`` with its
        recorded and new values.
    """
    old = recorded_config(workdir)
    if old is None or not saved_steps(checkpoint_dir(workdir)):
        return  # nothing saved yet (config.json is written before the first checkpoint)
    new = flat_config(config)
    changed = [k for k in new if old[k] != new[k] and not may_change(k)]
    if changed:
        lines = "\n".join(f"  {k}: {old[k]!r} in {CONFIG_FILE}, now {new[k]!r}" for k in changed)
        if "data.tokenizer_id" in changed:
            lines += (
                "\n  (data.tokenizer_id is the tokenizer file's kind, size and hash: "
                "data.tokenizer names a different or changed file)"
            )
        raise ConfigMismatchError(
            f"--workdir={workdir} holds a run whose config differs in fields that change the "
            f"saved state's shapes or meaning:\n{lines}\nNothing was written. Use a new "
            "--workdir for a new run, or the recorded values to resume this one; a resumed "
            f"run may change only {', '.join(RESUMABLE_FIELDS)}."
        )


def write_config(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Records ``config`` as ``workdir``'s config.json (readers never see a partial file)."""
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))


# finished_results' keys: (split, field) of the metrics.jsonl record at the final step.
_LOGGED_RESULTS = {
    "loss": ("train", "loss"),
    "nonfinite_total": ("train", "nonfinite_total"),
    "val_loss": ("validation", "loss"),
    "val_bits_per_byte": ("validation", "bits_per_byte"),
}


def finished_results(workdir: str | epath.Path, num_steps: int) -> dict | None:
    """A run's final results if ``workdir`` holds a checkpoint at ``num_steps``, else None.

    Returns:
      ``steps`` and, as logged at that step in metrics.jsonl, ``loss``,
      ``nonfinite_total``, ``val_loss``, ``val_bits_per_byte``; ``sample`` if the run
      wrote sample.txt.

    Raises:
      ValueError: the newest checkpoint is past ``num_steps`` (training.num_steps).
    """
    workdir = paths.path(workdir)
    steps = saved_steps(checkpoint_dir(workdir))
    if not steps or steps[-1] < num_steps:
        return None
    if steps[-1] > num_steps:
        raise ValueError(
            f"training.num_steps={num_steps} is invalid for --workdir={workdir}: its newest "
            f"checkpoint is step {steps[-1]}; must be >= {steps[-1]} (or use a new --workdir)"
        )
    file = workdir / METRICS_FILE
    last = {
        r["split"]: r
        for r in (read_jsonl(file) if file.exists() else [])
        if r.get("step") == num_steps
    }
    result: dict = {"steps": num_steps}
    # A record may lack a field (a log written by another version): report what it has.
    for name, (split, field) in _LOGGED_RESULTS.items():
        if field in last.get(split, {}):
            result[name] = last[split][field]
    if "nonfinite_total" in result:
        result["nonfinite_total"] = int(result["nonfinite_total"])
    if (workdir / SAMPLE_FILE).exists():
        result["sample"] = (workdir / SAMPLE_FILE).read_text()
    return result


def load_run(workdir: str, step: int | None = None) -> tuple[ModelConfig, dict, int]:
    """(ModelConfig, params, step) of a training run's checkpoint (newest by default);
    ``workdir`` local or gs://."""
    path = paths.path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is --workdir a training run directory?")
    cfg = config_lib.config_from_json(path.read_text())
    model_cfg = config_lib.model_config(cfg)
    tx = make_optimizer(config_lib.optimizer_config(cfg), cfg.training.num_steps)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, tx, cfg.training.seed))
    restored = Checkpointer(checkpoint_dir(workdir)).restore(abstract, step=step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    return model_cfg, restored.state.params, restored.step


def run_tokenizer(workdir: str) -> tokenizers.Tokenizer:
    """The tokenizer a training run recorded (``data.tokenizer``), checked against the
    identity it recorded (``data.tokenizer_id``).

    Raises:
      ValueError: the tokenizer file changed since the run (both identities named).
    """
    cfg = config_lib.config_from_json((paths.path(workdir) / CONFIG_FILE).read_text())
    tok = tokenizers.load(cfg.data.tokenizer)
    now = tokenizers.identity_string(tok.identity)
    if now != cfg.data.tokenizer_id:
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r} is now {now}, but the run in {workdir} "
            f"was trained with {cfg.data.tokenizer_id}: the tokenizer file changed"
        )
    return tok
