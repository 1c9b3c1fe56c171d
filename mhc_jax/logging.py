"""What a run writes for people and scripts: TensorBoard events, metrics.jsonl, a progress bar.

TensorBoard event files come from tensorboardX (no TensorFlow needed). Only
process 0 writes; other processes get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
PROFILES_FILE = "diagnostics.jsonl"


def _to_float(value) -> float:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else float("nan")


class MetricsLogger:
    """Writes scalars/images to TensorBoard and one JSON line per record to metrics.jsonl.

    Args:
      workdir: run directory; events go to ``workdir/tensorboard``.
      enabled: False on processes other than 0.
      total_steps: length of the progress bar.
      tensorboard: write TensorBoard events.
      progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        total_steps: int | None = None,
        tensorboard: bool = True,
        progress: bool = True,
        initial_step: int = 0,
    ):
        self.enabled = enabled
        self._workdir = workdir
        self._writer = self._jsonl = self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True
            )

    def scalars(self, step: int, split: str, values: Mapping[str, object]) -> None:
        """Logs ``values`` under ``split/<name>`` (TensorBoard) and as one jsonl record."""
        if not self.enabled:
            return
        record = {k: _to_float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **record}) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                self._writer.add_scalar(f"{split}/{key}", value, int(step))

    def profile(self, step: int, values: Mapping[str, object]) -> None:
        """Appends per-layer arrays (e.g. Amax gain per layer, H_res matrices) as one
        JSON record to diagnostics.jsonl: {"step": s, name: nested lists, ...}."""
        if not self.enabled:
            return
        record = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in values.items()}
        with open(os.path.join(self._workdir, PROFILES_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), **record}) + "\n")

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Logs an (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, image, int(step), dataformats="HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        """Logs text (e.g. a generated sample) to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_text(tag, text, int(step))

    def progress(self, step: int, **postfix) -> None:
        """Moves the progress bar to ``step`` and shows ``postfix`` (e.g. loss, tok/s)."""
        if self.enabled and self._bar is not None:
            self._bar.update(int(step) - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Prints a line without breaking the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def end_progress(self) -> None:
        """Closes the progress bar (later messages print as plain lines)."""
        if self.enabled and self._bar is not None:
            self._bar.close()
            self._bar = None

    def flush(self) -> None:
        if self.enabled and self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.end_progress()
        if self._writer is not None:
            self._writer.close()
        self._jsonl.close()
