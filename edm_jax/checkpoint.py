"""Train-state checkpoints with orbax: async saves, bounded history, fallback past a damaged newest one.

A checkpoint is a directory `<workdir>/checkpoints/<step>/` with two items:
  state: the whole `TrainState` (step, params, buffers, EMA params, Adam state incl. the injected lr);
  meta:  JSON with the data position and what must not change across a resume: {'step', 'nimg',
         'global_batch', 'seed', 'kimg', 'time'} plus whatever the caller adds.
The reference (training_loop.py) writes the EMA as `network-snapshot-*.pkl` and net + optimizer as
`training-state-*.pt` (without the EMA); here one checkpoint holds everything a bit-exact resume needs.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact and the half-written one is ignored.

Bit rot and edits after the save are caught by checksums: `meta['checksums']` holds, per array, the sum of its
32-bit words and a position-weighted sum (mod 2**32, computed on device, so saving costs one small
transfer); a restore recomputes and compares them (checkpoints without them: non-finite or absurd values
are refused instead). A checkpoint that fails is moved aside to `<directory>.damaged/` on request, so that
the run saves that step again, and the previous one is restored. A checkpoint that loads but does not fit
this run's train state (another network) is *incompatible*, not damaged: it is left alone and the error
says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

__all__ = ["Checkpointer", "CheckpointError", "checksums", "verify_checksums"]

log = logging.getLogger(__name__)

# Orbax's replica-parallel save splits every replicated array into one slice per device, so that each
# replica writes a part. A train state is hundreds of small replicated arrays (biases, norms, EMA copies):
# sliced eight ways, their writes cost far more than the bytes (first save of a tiny state: 13-17 s on CPU,
# 2-3 s unsliced). Arrays under 1 MiB per slice are written whole by one replica; large ones still split.
MIN_SLICE_BYTES = 1 << 20


def _register_array_handler():
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # the override is deliberate: no WARNING line on every run
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES),
            override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


_register_array_handler()


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored into the current train state."""


class _Damaged(ValueError):
    """The checkpoint's contents differ from what was written (checksums, impossible values)."""


class _Incompatible(ValueError):
    """The checkpoint is readable but holds another train state (tree, shapes or dtypes differ)."""


def _path_name(path) -> str:
    """'ema/enc_8x8_conv/kernel' for a key path of a TrainState or of the plain dicts orbax restores."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
    return "/".join(parts)


def _words(x):
    """The array's bits as uint32 words (flattened); 64-bit values give two words each."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))


@jax.jit
def _sums(leaves):
    def one(x):
        w = _words(x)
        i = jnp.arange(1, w.size + 1, dtype=jnp.uint32)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * i, dtype=jnp.uint32)])
    return [one(x) for x in leaves]


def checksums(tree) -> dict:
    """{path: [sum of words, position-weighted sum]} of every array in `tree` (mod 2**32; any one bit flip
    changes the first). Computed where the arrays live; only the sums move to the host."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)]
    sums = jax.device_get(_sums([x for _, x in flat]))
    return {_path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def verify_checksums(tree, expected: Optional[Mapping], prefixes=("",)) -> None:
    """Raise ValueError naming the first array whose checksum differs from `expected` (the ones under
    `prefixes` only). Without checksums (older checkpoints): refuse non-finite or absurd (> 1e30) floats."""
    if expected:
        got = checksums(tree)
        for name, want in expected.items():
            if name.startswith(prefixes) and name in got and list(got[name]) != list(want):
                raise _Damaged(f"checksum mismatch in {name}: the file changed after it was written")
        return
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating) and x.size and not np.all(np.abs(x) < 1e30):
            raise _Damaged(f"{_path_name(path)} holds non-finite or absurd values (max |x| "
                             f"{np.nanmax(np.abs(x)):.3g}): damaged")


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
        meta = {**meta, "checksums": checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
        return self._manager.save(int(step), args=args, force=True)

    def restore_latest(self, abstract_state: Any, *, move_damaged: bool = False):
        """Restore the newest checkpoint that loads, as (state, meta); None when there is none.

        `abstract_state`: the state's tree of `jax.ShapeDtypeStruct`s with shardings (e.g. from
        `jax.eval_shape` + the mesh), so arrays come back placed as training expects. A damaged checkpoint
        (truncated, bit flips: checksums) is skipped with a warning, moved aside if `move_damaged` (process 0
        of a training run, which then saves that step again), and the previous one is tried. Checkpoints of
        another train state are never called damaged: CheckpointError says they do not fit this config.
        """
        steps = self.steps()
        if not steps:
            return None
        damaged, incompatible = [], []
        for step in reversed(steps):
            try:
                self._check_stored_shapes(step, abstract_state)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], dict(restored["meta"])
                _check_restored(state, abstract_state)
                verify_checksums(state, meta.get("checksums"))
            except Exception as e:  # noqa: BLE001 (any failure means: this one is unusable)
                msg = f"{type(e).__name__}: {_first_line(e)}"
                if isinstance(e, _Incompatible) or (not isinstance(e, _Damaged) and _looks_incompatible(msg)):
                    incompatible.append((step, msg))
                    continue
                damaged.append((step, msg))
                where = os.path.join(self.directory, str(step))
                if move_damaged:
                    where = self._move_aside(step)
                log.warning("checkpoint %d is damaged (%s), moved to %s; trying the previous one", step, msg, where)
                continue
            if damaged or incompatible:
                log.warning("resuming from checkpoint %d instead of the newest (%d)", step, steps[-1])
            return state, meta
        if incompatible:
            step, msg = incompatible[0]
            raise CheckpointError(
                f"the checkpoints in {self.directory} hold a different train state than this config builds "
                f"(step {step}: {msg}); they are intact: rerun with the config they were trained with (kept in "
                f"each checkpoint's meta and in the workdir's config.json), or use a new --workdir.")
        reasons = "; ".join(f"step {step}: {msg}" for step, msg in damaged[:2])
        raise CheckpointError(f"all {len(steps)} checkpoints in {self.directory} are damaged ({reasons}); "
                              f"start over with a new --workdir.")

    def _check_stored_shapes(self, step: int, abstract_state: Any) -> None:
        """Refuse a checkpoint of another network from its metadata, before any array is read. Why not let
        the restore find out: orbax reads all arrays concurrently and raises at the first misfit; the reads
        still in flight then complete into its closed event loop, and their callbacks print asyncio tracebacks
        ('Event loop is closed') onto the screen, after or inside our one-sentence error."""
        path = epath.Path(self.directory) / str(step) / "state"
        try:
            stored = ocp.StandardCheckpointHandler().metadata(path)
        except Exception:  # noqa: BLE001 (unreadable metadata: the restore below says what is damaged)
            return
        stored = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
        for p, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            got = stored.get(_path_name(p))
            if (got is None or jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key)
                    or getattr(got, "shape", None) is None):
                continue  # names orbax stores differently are left to the restore's own checks
            if tuple(got.shape) != tuple(want.shape):
                raise _Incompatible(f"array {_path_name(p)} is {tuple(got.shape)} in the checkpoint where this run "
                                    f"has {tuple(want.shape)}")

    def _move_aside(self, step: int) -> str:
        """Move a damaged checkpoint out of the manager's sight (kept for inspection) and forget it."""
        target = os.path.join(self.directory + ".damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        return target

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
        raise _Incompatible("tree structure differs from this run's train state")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise _Incompatible(f"array {a.shape} {a.dtype} where this run has {b.shape} {b.dtype}")


def _looks_incompatible(msg: str) -> bool:
    """Orbax's own words for a checkpoint of another tree or shape (it checks before reading data)."""
    return any(w in msg.lower() for w in ("shape", "structure", "mismatch", "missing", "unexpected key"))


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
