"""The run configuration: one locked ``ml_collections.ConfigDict`` with every field.

Experiment config files start from ``default_config()`` and change what they
need; command-line overrides (``--config.model.n=8``) then set any field, and a
misspelt key is an error because the dict is locked. ``model_config`` and
``optimizer_config`` convert to the validated frozen dataclasses at the boundary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from types import ModuleType

import ml_collections

from mhc_jax import tokenizers
from mhc_jax.model import ModelConfig
from mhc_jax.optim import OptimizerConfig
from mhc_jax.sharding import MeshConfig


def _from_dataclass(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def default_config() -> ml_collections.ConfigDict:
    """Every field of a run, with defaults; locked so unknown keys fail."""
    cfg = ml_collections.ConfigDict()
    cfg.model = _from_dataclass(ModelConfig)
    cfg.optimizer = _from_dataclass(OptimizerConfig)
    cfg.data = ml_collections.ConfigDict(
        dict(
            path="",  # "" = bundled corpus; else a prepared dir or text files/dirs
            # "byte" | sentencepiece:PATH | hf:PATH | tiktoken:PATH (mhc_jax/tokenizers.py)
            tokenizer="byte",
            text_field="text",  # the JSON field / parquet column of raw sources' text
            # set by resolve_tokenizer: the tokenizer's kind, vocab size and file hash
            tokenizer_id=tokenizers.BYTE_IDENTITY,
            cache_dir="",  # "" = <workdir>/data
            seq_len=128,
            batch_size=16,  # global, across processes and devices
            seed=0,
            worker_count=0,
            eval_batch_size=16,
            eval_max_batches=16,  # 0 = the whole validation split
        )
    )
    cfg.training = ml_collections.ConfigDict(
        dict(
            num_steps=300,
            seed=0,
            eval_every=100,
            checkpoint_every=100,
            keep_last=3,
            keep_best=1,
            async_checkpointing=True,
            max_nonfinite_streak=10,
            # XLA's run-to-run deterministic mode for the jitted steps (GPU: deterministic
            # scatter for the embedding gradient, and XLA attention instead of cuDNN's; CPU
            # runs are deterministic without it). See docs/training.md.
            deterministic=False,
            sample_tokens=200,
            sample_prompt="ROMEO:",
            sample_temperature=0.8,
            sample_top_k=40,
        )
    )
    cfg.sharding = _from_dataclass(MeshConfig)
    cfg.logging = ml_collections.ConfigDict(
        dict(
            log_every=10,
            diagnostics_every=50,
            tensorboard=True,
            progress=True,
        )
    )
    cfg.lock()
    return cfg


def apply_model_overrides(cfg: ml_collections.ConfigDict, arg: str | None) -> None:
    """Applies a config-file argument ``"key=value,key=value"`` to ``cfg.model``.

    Values are parsed as int, float or bool where possible, else kept as strings;
    an unknown key raises a KeyError naming it and the known model fields.
    """
    if not arg:
        return
    for item in arg.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in cfg.model:
            raise KeyError(
                f"config argument {item!r}: expected key=value with a model field; "
                f"known fields: {sorted(cfg.model.keys())}"
            )
        current = cfg.model[key]
        if isinstance(current, bool):
            value = raw.strip().lower() in ("1", "true", "yes")
        else:
            value = type(current)(raw.strip())
        cfg.model[key] = value


def load_python_file(path: str, name: str) -> ModuleType:
    """The module a Python file (a config or sweep file) defines, run under ``name``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path  # a file that exists
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """A config file's ``get_config(arg)``, as ``--config=path:arg`` gives it to train.py."""
    name = "mhc_config_" + os.path.splitext(os.path.basename(path))[0]
    module = load_python_file(path, name)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuilds a run's config from the config.json it wrote (JSON lists become tuples)."""

    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", tuple(value) if isinstance(value, list) else value

    cfg = default_config()
    cfg.update_from_flattened_dict(dict(flatten(json.loads(text))))
    return cfg


def resolve_tokenizer(cfg: ml_collections.ConfigDict):
    """Loads ``data.tokenizer``, records its identity in ``data.tokenizer_id`` and sizes
    ``model.vocab_size`` by it (a model left at the byte vocabulary's default takes the
    tokenizer's size). Returns the tokenizer.

    Raises:
      ValueError: a bad spec, or a ``model.vocab_size`` set to another size (both named).
    """
    tok = tokenizers.load(cfg.data.tokenizer)
    cfg.data.tokenizer_id = tokenizers.identity_string(tok.identity)
    vocab, default = cfg.model.vocab_size, ModelConfig.vocab_size
    if tok.kind != "byte" and vocab == default:
        cfg.model.vocab_size = tok.vocab_size
    elif vocab < tok.vocab_size or (tok.kind != "byte" and vocab != tok.vocab_size):
        raise ValueError(
            f"model.vocab_size={vocab} is invalid: data.tokenizer={cfg.data.tokenizer!r} has "
            f"{tok.vocab_size} tokens; leave model.vocab_size at {default} to take that size"
        )
    return tok


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The validated ModelConfig of ``cfg.model``."""
    return ModelConfig(**cfg.model.to_dict())


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """The validated OptimizerConfig of ``cfg.optimizer``."""
    fields = cfg.optimizer.to_dict()
    for key in ("step_boundaries", "step_factors"):
        fields[key] = tuple(fields[key])
    return OptimizerConfig(**fields)


def mesh_config(cfg: ml_collections.ConfigDict) -> MeshConfig:
    """The validated MeshConfig of ``cfg.sharding``."""
    return MeshConfig(**cfg.sharding.to_dict())


def validate(cfg: ml_collections.ConfigDict, data_shards: int, process_count: int) -> None:
    """Checks the fields that no dataclass owns; raises ValueError naming field and value."""

    def check(ok, field, allowed):
        if not ok:
            section, name = field.split(".")
            raise ValueError(f"{field}={cfg[section][name]!r} is invalid: must be {allowed}")

    t, d, lg = cfg.training, cfg.data, cfg.logging
    check(t.num_steps >= 1, "training.num_steps", ">= 1")
    for field in ("eval_every", "checkpoint_every"):
        check(t[field] >= 1, f"training.{field}", ">= 1")
    check(t.keep_last >= 1, "training.keep_last", ">= 1")
    check(t.max_nonfinite_streak >= 1, "training.max_nonfinite_streak", ">= 1")
    check(d.seq_len >= 1, "data.seq_len", ">= 1")
    accum = cfg.optimizer.grad_accum_steps
    unit = data_shards * accum
    check(
        d.batch_size >= 1 and d.batch_size % unit == 0,
        "data.batch_size",
        f"a positive multiple of the data shards ({data_shards}: sharding.data x sharding.fsdp)"
        f" x optimizer.grad_accum_steps ({accum})",
    )
    check(
        d.eval_batch_size % data_shards == 0 and d.eval_batch_size >= 1,
        "data.eval_batch_size",
        f"a positive multiple of the data shards ({data_shards})",
    )
    check(
        d.batch_size % process_count == 0,
        "data.batch_size",
        f"divisible by {process_count} processes",
    )
    for field in ("log_every", "diagnostics_every"):
        check(lg[field] >= 1, f"logging.{field}", ">= 1")
