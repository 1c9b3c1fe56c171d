"""What a run writes for people and scripts: TensorBoard events, metrics.jsonl, a progress bar.

TensorBoard event files come from tensorboardX (no TensorFlow needed). Only
process 0 writes; other processes get a logger whose methods do nothing.

A cloud workdir (gs://) cannot be appended to: the logger then writes into a local
directory (metrics.jsonl and diagnostics.jsonl start as copies of the workdir's) and
``sync`` uploads the files that changed. The loop syncs after each checkpoint, the
logger every ``sync_every_s`` seconds and on ``close``; a killed process loses what it
logged since, and the resumed run logs those steps again (readers keep the last record
of a step).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from typing import TextIO

import numpy as np
from etils import epath

from mhc_jax import paths

METRICS_FILE = "metrics.jsonl"
PROFILES_FILE = "diagnostics.jsonl"


def read_jsonl(path: str | epath.Path) -> list[dict]:
    """Records of a JSON-lines file; a truncated last line (a killed writer) is dropped."""
    lines = [line for line in paths.path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
    return records


def _to_float(value) -> float:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else float("nan")


class MetricsLogger:
    """Writes scalars/images to TensorBoard and one JSON line per record to metrics.jsonl.

    Args:
      workdir: run directory, local or gs://; events go to ``workdir/tensorboard``.
      enabled: False on processes other than 0.
      total_steps: length of the progress bar.
      tensorboard: write TensorBoard events.
      progress: show a tqdm progress bar.
      initial_step: where the progress bar starts.
      sync_every_s: longest time between uploads to a gs:// workdir.
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
        sync_every_s: float = 60.0,
    ):
        self.enabled = enabled
        self._writer = self._bar = self._staging = None
        self._jsonl: TextIO | None = None
        if not enabled:
            return
        self._workdir = paths.path(workdir)
        self._sync_every_s = sync_every_s
        self._synced: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) uploaded
        if paths.is_remote(self._workdir):
            self._staging = tempfile.TemporaryDirectory(prefix="mhc_jax_logs-")
            self._dir = epath.Path(self._staging.name)
            for name in (METRICS_FILE, PROFILES_FILE):
                if (self._workdir / name).exists():
                    (self._workdir / name).copy(self._dir / name)
        else:
            self._dir = self._workdir
            self._dir.mkdir(parents=True, exist_ok=True)
        self._last_sync = time.monotonic()
        self._jsonl = open(self._dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self._dir / "tensorboard"))
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
        self._metrics_file.write(json.dumps({"step": int(step), "split": split, **record}) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                self._writer.add_scalar(f"{split}/{key}", value, int(step))
        if self._staging is not None and time.monotonic() - self._last_sync > self._sync_every_s:
            self.sync()

    def profile(self, step: int, values: Mapping[str, object]) -> None:
        """Appends per-layer arrays (e.g. Amax gain per layer, H_res matrices) as one
        JSON record to diagnostics.jsonl: {"step": s, name: nested lists, ...}."""
        if not self.enabled:
            return
        record = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in values.items()}
        with open(self._dir / PROFILES_FILE, "a") as f:
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

    @property
    def _metrics_file(self) -> TextIO:
        assert self._jsonl is not None, "an enabled logger opened metrics.jsonl"
        return self._jsonl

    def sync(self) -> None:
        """Uploads the files written since the last sync to a gs:// workdir (else nothing)."""
        if not self.enabled or self._staging is None:
            return
        self._metrics_file.flush()
        if self._writer is not None:
            self._writer.flush()
        for file in paths.walk_files(self._dir):
            stat = os.stat(file)
            name = str(file.relative_to(self._dir))
            if self._synced.get(name) != (stat.st_size, stat.st_mtime_ns):
                target = self._workdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                file.copy(target, overwrite=True)
                self._synced[name] = (stat.st_size, stat.st_mtime_ns)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.end_progress()
        self.sync()
        if self._writer is not None:
            self._writer.close()
        self._metrics_file.close()
        if self._staging is not None:
            self._staging.cleanup()
