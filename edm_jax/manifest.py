"""What made a sample folder: a manifest beside the images, so that a rerun never mixes two models' samples.

`generate.generate` resumes by file name: a seed whose PNG exists is skipped. That is only right when the
file was made by the same model and sampler, so `--mode=sample` records, in `<outdir>/manifest.json`:

    model      where it came from (checkpoint or run directory), its training step if it has one, and a
               SHA-256 fingerprint of the parameters' bytes (a retrained or edited model differs even at the
               same path and step)
    sampling   the sampler settings, the seeds' key root (`base_seed`: image s uses fold_in(key(base_seed), s)),
               the class, the classifier-free guidance weight and the classifier guidance (its run and scale)
    layout     file format and subfolders (they decide which file a seed is)

A rerun resumes only when every field matches; otherwise it stops with one sentence naming the fields that
differ. `clear` empties a folder of what sampling writes (images, grid, npz, manifest) and nothing else.
The seed list is not recorded: extending a folder with more seeds of the same model is the point of resuming.

Multi-host: only process 0 writes the manifest; every process checks it (see `prepare`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["MANIFEST_FILE", "ManifestMismatchError", "params_fingerprint", "describe", "differences", "check",
           "clear", "prepare"]

MANIFEST_FILE = "manifest.json"
VERSION = 1
_SEED_NAME = re.compile(r"^\d{6,}\.png$")  # generate.image_path's file names
_SEED_DIR = re.compile(r"^\d{6,}$")        # its subfolders of 1000 seeds
_OTHER_OUTPUTS = ("grid.png", "samples.npz")  # generate.GRID_FILE, generate.NPZ_FILE
_PARTS_DIR = "parts"                          # generate.PARTS_DIR


class ManifestMismatchError(ValueError):
    """The folder's samples were made by another model or with other settings (a one-sentence message)."""


def params_fingerprint(params) -> str:
    """SHA-256 (hex) over every leaf's path, dtype, shape and bytes, in the tree's own (sorted-key) order.

    Reads each leaf once on the host (about a second per GB); replicated multi-host arrays are read from
    this process's first shard, which holds the whole array.
    """
    import jax

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.view(np.uint8).reshape(-1).data if array.size else b"")
    return digest.hexdigest()


def _plain(value):
    """JSON's view of a value (tuples as lists, other objects as their str), so a fresh description compares
    equal to the same one read back from disk."""
    return json.loads(json.dumps(value, default=str))


def describe(*, source: str, step: Optional[int], fingerprint: str, settings: Any, base_seed: int,
             class_idx: Optional[int], guidance: float, classifier: Optional[str], classifier_scale: float,
             fmt: str, subdirs: bool) -> dict:
    """The manifest of a sampling run, as plain JSON data (see the module docstring for the fields).

    `settings`: the sampler settings actually used (a dataclass or plain data); `classifier`: a classifier
    run directory or None (then `classifier_scale` is not recorded: it changes nothing)."""
    return _plain({
        "version": VERSION,
        "model.source": os.path.abspath(os.fspath(source)),
        "model.step": None if step is None else int(step),
        "model.params_sha256": fingerprint,
        "sampler": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings,
        "base_seed": int(base_seed),
        "class": None if class_idx is None else int(class_idx),
        "guidance": float(guidance or 0.0),
        "classifier": None if classifier is None else os.path.abspath(os.fspath(classifier)),
        "classifier_scale": None if classifier is None else float(classifier_scale),
        "format": fmt,
        "subdirs": bool(subdirs) if fmt == "png" else None,
    })


def differences(old: Mapping, new: Mapping) -> list[str]:
    """'field: old -> new' for every differing field; the sampler settings field by field."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {_short(a)!r} -> {_short(b)!r}")
    return out


def _short(value):
    return value[:12] + "…" if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else value


def _outputs(outdir: str) -> list[str]:
    """Names in `outdir` that sampling writes (seed PNGs, their subfolders, grid, npz, parts)."""
    if not os.path.isdir(outdir):
        return []
    names = []
    for name in sorted(os.listdir(outdir)):
        path = os.path.join(outdir, name)
        if os.path.isdir(path):
            if name == _PARTS_DIR or (_SEED_DIR.match(name) and all(_SEED_NAME.match(n) or n.startswith(".")
                                                                     for n in os.listdir(path))):
                names.append(name)
        elif _SEED_NAME.match(name) or name in _OTHER_OUTPUTS:
            names.append(name)
    return names


def check(outdir: str, manifest: Mapping) -> bool:
    """Whether `outdir` already has a manifest, after checking that sampling `manifest` there mixes nothing.

    Fine: its manifest equals `manifest` (True), or it has none and holds no samples (False: write one).
    Raises ManifestMismatchError when the manifest differs, is unreadable, or samples lie there without one."""
    path = os.path.join(outdir, MANIFEST_FILE)
    hint = "pass a new --outdir, or --overwrite to delete the samples there first"
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ManifestMismatchError(f"{path} is unreadable ({type(e).__name__}), so it is unknown what made "
                                        f"the samples in {outdir}; {hint}") from None
        diff = differences(old, dict(manifest))
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ManifestMismatchError(f"{outdir} holds samples made differently ({shown}); {hint}")
        return True
    found = _outputs(outdir)
    if found:
        raise ManifestMismatchError(f"{outdir} already holds samples ({', '.join(found[:3])}"
                                    f"{', …' if len(found) > 3 else ''}) but no {MANIFEST_FILE} saying what "
                                    f"made them; {hint}")
    return False


def clear(outdir: str, *, manifest: bool = True) -> list[str]:
    """Delete what sampling wrote in `outdir` (seed PNGs and their subfolders, grid.png, samples.npz,
    parts/, and the manifest unless `manifest=False`); other files stay. Returns the names removed."""
    names = _outputs(outdir) + ([MANIFEST_FILE] if manifest and os.path.isfile(os.path.join(outdir, MANIFEST_FILE))
                                else [])
    for name in names:
        path = os.path.join(outdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def _write(outdir: str, manifest: Mapping):
    """Write the manifest atomically (temporary file, then rename), so a killed run leaves none or all."""
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, MANIFEST_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(dict(manifest), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare(outdir: str, manifest: Mapping, *, overwrite: bool = False) -> None:
    """Make `outdir` ready for samples described by `manifest`; call it on every process before sampling.

    overwrite: first clear the folder (`clear`: process 0, then the others, in turn, so that hosts sharing
    a filesystem never delete the same files at once). Then process 0 checks the folder and writes the
    manifest if there is none yet; after a barrier every other process checks what it sees (on a shared
    filesystem, process 0's manifest). If any process refuses, all raise ManifestMismatchError.
    """
    import jax

    count, index = jax.process_count(), jax.process_index()

    def barrier(name):
        if count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"edm_jax.manifest: {name}")

    if overwrite and index == 0:
        clear(outdir)
    barrier("cleared by process 0")
    if overwrite and index != 0:
        clear(outdir, manifest=False)  # images on this host's disk if it is not shared; the manifest is process 0's
    barrier("cleared")
    error = None
    if index == 0:
        try:
            if not check(outdir, manifest):
                _write(outdir, manifest)
        except ManifestMismatchError as e:
            error = e
    barrier("written")
    if index != 0:
        try:
            check(outdir, manifest)
        except ManifestMismatchError as e:
            error = e
    if count > 1:
        from jax.experimental import multihost_utils

        refused = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if refused.any() and error is None:
            error = ManifestMismatchError(f"process(es) {np.flatnonzero(refused).tolist()} refused the sample "
                                          f"folder {outdir}; their last line says why")
    if error is not None:
        raise error
