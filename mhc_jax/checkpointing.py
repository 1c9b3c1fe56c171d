"""Checkpoints of the train state, data-iterator state, run config and metrics (orbax).

Step ``<directory>/<step>/`` holds the items ``state`` (array pytree), ``data_state``,
``config``, ``user_metrics`` (JSON) and orbax's ``metrics`` (JSON, only when the step has
``best_metric``; reloaded on start-up so best-N retention survives restarts).

Atomicity (verified in orbax-checkpoint 0.12): a step is written to
``<step>.orbax-checkpoint-tmp*/`` and renamed to ``<step>/`` once every item is written (on
GCS, where rename is not atomic, ``commit_success.txt`` marks the commit instead). Step
discovery skips unfinalised directories, so a killed process's leftovers are never
restored. Retention deletes old steps in orbax's finalize step only after the new step is
committed (a failed write raises first), so the last good checkpoint is never removed first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mhc_jax import paths

log = logging.getLogger(__name__)

_JSON_ITEMS = ("data_state", "config", "user_metrics")
_QUARANTINE_DIR = "unrestorable"


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """One restored step; ``state`` has the structure, dtypes and shardings of the target."""

    step: int
    state: Any
    data_state: dict | None
    config: dict
    metrics: dict[str, float] | None


class CheckpointMismatchError(ValueError):
    """A checkpoint's state tree (leaf paths or shapes) differs from the restore target."""


class Checkpointer:
    """Async orbax checkpointing with last-N + best-N retention and fallback on corruption.

    Retention keeps the newest ``keep_last`` steps plus the ``keep_best`` steps with the
    lowest (``best_mode="min"``) or highest ``metrics[best_metric]``; steps saved without a
    finite ``best_metric`` are kept only while among the newest.
    """

    def __init__(
        self,
        directory: str,  # local or gs://
        *,
        keep_last: int = 3,
        keep_best: int = 1,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        async_save: bool = True,
        save_interval_steps: int = 1,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest step is kept), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.best_metric = best_metric
        worst = math.inf if best_mode == "min" else -math.inf

        def metric_of(metrics: dict) -> float:
            # Stored metrics lacking best_metric (saved under another best_metric) rank last.
            return metrics.get(best_metric, worst)

        policy = ocp_managers.AnyPreservationPolicy(
            [
                ocp_managers.LatestN(n=keep_last),
                ocp_managers.BestN(
                    get_metric_fn=metric_of,
                    reverse=best_mode == "min",  # BestN keeps the tail of the sorted steps
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
            # Retention follows `policy` alone; best_fn only makes orbax write each step's
            # metrics to disk (and reload them on start-up) for BestN to rank.
            best_fn=metric_of,
            best_mode=best_mode,
        )
        handlers = {"state": ocp.StandardCheckpointHandler()}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS})
        self._manager = ocp.CheckpointManager(
            paths.path(directory), item_handlers=handlers, options=options
        )
        # Steps newer than a fallback restore that failed to load; moved aside on the next
        # save, since orbax refuses to save at or below its latest step.
        self._unrestorable: set[int] = set()

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        """Newest step saved or found on disk (may still be writing; see wait_until_finished)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps found on disk at construction plus those saved since, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict | None,
        config: dict,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step`` (async: returns once arrays are copied to host memory).

        Args:
            step: skipped (returns False) at or below the latest step or off the
                ``save_interval_steps`` grid unless ``force``; never overwrites a step.
            state: pytree of jax arrays (any shapes/dtypes/shardings; typed PRNG keys).
            data_state: JSON-serialisable data-iterator state, or None.
            config: JSON-serialisable run config.
            metrics: name -> float-convertible scalar, e.g. ``{"val_loss": 2.3}``.
        """
        for name, value in (("data_state", data_state), ("config", config)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name} must be JSON-serialisable: {err}") from err
        if metrics is not None:
            try:
                metrics = {str(k): float(v) for k, v in metrics.items()}
            except (TypeError, ValueError) as err:
                raise TypeError(f"metrics values must be scalars, got {metrics!r}") from err
        has_best = metrics is not None and math.isfinite(metrics.get(self.best_metric, math.nan))
        self._quarantine_unrestorable()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            user_metrics=ocp.args.JsonSave(metrics),
        )
        return self._manager.save(
            step, args=args, metrics=metrics if has_best else None, force=force
        )

    def restore(self, abstract_state: Any, *, step: int | None = None) -> RestoredCheckpoint | None:
        """Restores ``step``, or else the newest step that loads, onto ``abstract_state``.

        Args:
            abstract_state: pytree of ``jax.ShapeDtypeStruct`` or arrays giving the
                structure, shapes, dtypes (stored values are cast to them) and shardings.
            step: a specific step (no fallback: its failure to load raises).

        Returns:
            The restored checkpoint, or None if the directory has no checkpoint.

        Raises:
            CheckpointMismatchError: the checkpoint's leaf paths or shapes differ from
                ``abstract_state`` (a different model); no fallback to older steps.
            RuntimeError: ``step`` or, without it, every step failed to load (corrupt).
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(f"step={step} has no checkpoint in {self.directory}: {steps}")
            return self._restore_step(step, abstract_state)
        failures = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, abstract_state)
            except CheckpointMismatchError:
                raise
            except RuntimeError as err:
                log.warning("%s; falling back to an older step", err)
                failures.append(str(err))
                continue
            self._unrestorable.update(s for s in steps if s > candidate)
            return restored
        if failures:
            raise RuntimeError("no checkpoint could be restored: " + "; ".join(failures))
        return None

    def wait_until_finished(self) -> None:
        """Blocks until pending async saves are committed; re-raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        self._manager.close()

    def _restore_step(self, step: int, abstract_state: Any) -> RestoredCheckpoint:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            **{name: ocp.args.JsonRestore() for name in _JSON_ITEMS},
        )
        try:
            out = self._manager.restore(step, args=args)
        except Exception as err:
            mismatch = self._tree_mismatch(step, abstract_state)
            if mismatch:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {self.directory} does not match the restore "
                    f"target: {mismatch}"
                ) from err
            raise RuntimeError(
                f"checkpoint step {step} in {self.directory} failed to restore: "
                f"{type(err).__name__}: {err}"
            ) from err
        return RestoredCheckpoint(
            step, out["state"], out["data_state"], out["config"], out["user_metrics"]
        )

    def _tree_mismatch(self, step: int, abstract_state: Any) -> str:
        """How the stored state tree differs from ``abstract_state``; "" if it matches or the
        stored metadata cannot be read (then the failure is treated as corruption)."""
        try:
            stored = _leaf_shapes(self._manager.metadata(step).item_metadata["state"])
        except Exception:
            return ""
        as_stored = jax.tree.map(_storage_struct, abstract_state)
        expected = _leaf_shapes(ocp.tree.serialize_tree(as_stored, keep_empty_nodes=False))
        problems = [
            f"{path}: checkpoint shape {stored[path]} vs expected {shape}"
            for path, shape in expected.items()
            if path in stored and stored[path] != shape
        ]
        if missing := sorted(expected.keys() - stored.keys()):
            problems.append(f"missing from checkpoint: {_preview(missing)}")
        if extra := sorted(stored.keys() - expected.keys()):
            problems.append(f"only in checkpoint: {_preview(extra)}")
        return "; ".join(problems)

    def _quarantine_unrestorable(self) -> None:
        """Moves unrestorable steps to ``<directory>/unrestorable/`` (kept for inspection)."""
        if not self._unrestorable:
            return
        root = self._manager.directory
        if jax.process_index() == 0:
            quarantine = root / _QUARANTINE_DIR
            quarantine.mkdir(parents=True, exist_ok=True)
            # Cloud storage has no empty folders, and a move needs its target's folder to
            # exist: a file in it makes it exist there too.
            (quarantine / "README.txt").write_text(
                "Checkpoint steps that failed to restore, moved here for inspection.\n"
            )
            for step in sorted(self._unrestorable):
                path = root / str(step)  # orbax's default step name format: the bare number
                if path.exists():
                    dest = quarantine / f"{step}-{time.time_ns()}"
                    log.warning("Moving unrestorable checkpoint %s to %s", path, dest)
                    path.rename(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mhc_jax.checkpointing.quarantine")
        self._unrestorable.clear()
        self._manager.reload()


def saved_steps(directory: str) -> list[int]:
    """Committed steps in ``directory`` (local or gs://), ascending; creates nothing.

    A step still being written, or left unfinished by a killed writer, is not committed.
    """
    return sorted(ocp.utils.checkpoint_steps(paths.path(directory)))


def _storage_struct(leaf: Any) -> Any:
    """Typed PRNG keys are stored as their uint32 key data (shape + (2,) for threefry)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, leaf)
    return leaf


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(x, "shape", ()))
        for path, x in leaves
    }


def _preview(paths: list[str], limit: int = 8) -> str:
    more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
