"""Train-state checkpoints with orbax: async saves, bounded history, fallback past a damaged newest one.

A checkpoint is a directory `<workdir>/checkpoints/<step>/` with two items:
  state: the whole `TrainState` (step, params, buffers, EMA params, Adam state incl. the injected lr);
  meta:  JSON with the data position and what must not change across a resume: {'step', 'nimg',
         'global_batch', 'seed', 'kimg', 'time'} plus whatever the caller adds.
The reference (training_loop.py) writes the EMA as `network-snapshot-*.pkl` and net + optimizer as
`training-state-*.pt` (without the EMA); here one checkpoint holds everything a bit-exact resume needs.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact and the half-written one is ignored.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError"]

log = logging.getLogger("edm_jax")


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored into the current train state."""


class Checkpointer:
    """Saves and restores (TrainState, meta) pairs under `directory`.

    max_to_keep: the newest checkpoints kept; keep_period: also keep forever every checkpoint whose step is
    a multiple of it (the reference's periodic state dumps); None keeps none extra. async_save: write in a
    background thread while training continues (`wait()` blocks until written).
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, keep_period: Optional[int] = None,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self):
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> bool:
        """Start saving `state` (a pytree of jax Arrays) and JSON-able `meta` as checkpoint `step`."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        return self._manager.save(int(step), args=args, force=True)

    def restore_latest(self, abstract_state: Any):
        """Restore the newest checkpoint that loads, as (state, meta); None when there is none.

        `abstract_state`: the state's tree of `jax.ShapeDtypeStruct`s with shardings (e.g. from
        `jax.eval_shape` + the mesh), so arrays come back placed as training expects. A checkpoint that
        fails to load (truncated, corrupted) is skipped with a warning and the previous one is tried; if
        all fail, CheckpointError names the directory, the first error and the fix.
        """
        steps = self.steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], dict(restored["meta"])
                _check_restored(state, abstract_state)
            except Exception as e:  # noqa: BLE001 (any failure means: this one is unusable)
                msg = f"{type(e).__name__}: {_first_line(e)}"
                errors.append((step, msg))
                log.warning("checkpoint %s is unreadable (%s); trying the previous one",
                            os.path.join(self.directory, str(step)), msg)
                continue
            if errors:
                log.warning("resuming from checkpoint %d instead of the newest (%d)", step, steps[-1])
            return state, meta
        seen = {}
        for step, msg in errors:
            seen.setdefault(msg, step)
        reasons = "; ".join(f"step {step}: {msg}" for msg, step in list(seen.items())[:2])
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} can be restored into this run's train "
            f"state ({reasons}); if the config changed, use a new --workdir, otherwise delete the damaged "
            f"checkpoint directories.")

    def wait(self):
        """Block until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def _check_restored(state, abstract_state):
    """Orbax can restore a foreign checkpoint loosely; insist on the exact tree, shapes and dtypes."""
    got = jax.tree.structure(state)
    want = jax.tree.structure(abstract_state)
    if got != want:
        raise ValueError("tree structure differs from this run's train state")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"array {a.shape} {a.dtype} where this run has {b.shape} {b.dtype}")


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
