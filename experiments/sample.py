r"""Generates text from a training run's newest checkpoint.

    python experiments/sample.py --workdir=runs/tiny --prompt="ROMEO:" --num_tokens=300 \
        --temperature=0.8 --top_k=40
    python experiments/sample.py --workdir=runs/tiny --temperature=0     # greedy

The model is rebuilt from the run's config.json; the checkpoint holds the weights.
``--workdir`` may be local or gs://.
"""

import jax
import numpy as np
from absl import app, flags

from mhc_jax.run_dir import load_run, run_tokenizer
from mhc_jax.sampling import generate, sample_prompt

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory written by experiments/train.py (local or gs://)."
)
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 300, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample from the k most likely tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    tok = run_tokenizer(_WORKDIR.value)  # before the checkpoint: a changed file stops here
    model_cfg, params, step = load_run(_WORKDIR.value, _STEP.value)
    prompt = sample_prompt(tok, _PROMPT.value)
    out = generate(
        params,
        model_cfg,
        prompt,
        _NUM_TOKENS.value,
        rng=jax.random.key(_SEED.value),
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
    )
    print(f"[step {step}]")
    print(tok.decode(np.asarray(out[0])))


if __name__ == "__main__":
    app.run(main)
