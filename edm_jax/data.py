"""Input pipelines: reference-format image datasets, TFDS, a built-in synthetic set, and batches.

Every loader returns an `ImageDataset`: the whole dataset decoded into host memory as one uint8 array
[N, H, W, C] (NHWC, as everywhere in edm-jax) plus optional integer class labels. Small and medium
datasets (CIFAR-10: 150 MB, ImageNet-64: 16 GB) fit in a training host's RAM, and holding them decoded
makes `batches` a pure gather, so the host never becomes the bottleneck.

`batches` turns a dataset into the training stream. The stream is a pure function of (seed, step):
the global batch of step s is positions [s·B, (s+1)·B) of the concatenation of per-epoch permutations,
so the "data position" saved in a checkpoint is just the step, a resumed run sees exactly the batches an
uninterrupted run would have seen, and every host computes its own slice without talking to the others.
(The reference uses `InfiniteSampler` with a rolling window reshuffle and per-rank strided indices; its
stream cannot be resumed and depends on the GPU count. Ours depends only on (seed, step, global batch).)

This module uses numpy and PIL only; `tensorflow_datasets` is imported lazily inside `load_tfds`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import os
import queue
import threading
import zipfile
import zlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import PIL.Image

__all__ = [
    "DatasetUnavailableError",
    "ImageDataset",
    "load_image_dataset",
    "read_labels",
    "synthetic_dataset",
    "load_tfds",
    "load_dataset",
    "batch_indices",
    "host_indices",
    "batches",
    "Batches",
]

_LOCAL_COPY_HINT = ("set data.tfds_data_dir to a directory holding the prepared TFDS dataset, or data.path "
                    "to a reference-format zip such as ../shared/data/cifar10-jpeg-train.zip")


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be obtained (package missing, not prepared, offline); the message says how to
    point the config at a local copy instead."""


# ------------------------------------------------------------------------------------------------------
# The dataset container.

@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A decoded image dataset held in host memory.

    Attributes:
      images: uint8 [N, H, W, C] with H == W (NHWC; grayscale images have C = 1).
      labels: int64 [N] class indices in [0, label_dim), or None for an unlabelled dataset.
      label_dim: width of the one-hot class labels the network is conditioned on: max label + 1 as in the
        reference (`label_shape = [max + 1]`), 0 when unlabelled. Derived when left as None.
      resolution: H (= W). Derived when None; checked against `images` when given.
      channels: C. Derived when None; checked against `images` when given.
      name: a short name (the zip or folder name without extension, the TFDS name, ...).
      decoded: bool [N], which images hold pixels (`load_image_dataset(only=...)` decodes a subset and
        leaves the rest zero); None when all do. `batches` refuses to read an image that was not decoded.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    label_dim: int | None = None
    resolution: int | None = None
    channels: int | None = None
    name: str = "dataset"
    decoded: np.ndarray | None = None

    def __post_init__(self):
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"ImageDataset {self.name!r}: images must be a uint8 numpy array [N, H, W, C], got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                             f"{getattr(images, 'shape', '')}.")
        n, h, w, c = images.shape
        if n == 0:
            raise ValueError(f"ImageDataset {self.name!r} holds no images.")
        if self.decoded is not None and np.shape(self.decoded) != (n,):
            raise ValueError(f"ImageDataset {self.name!r}: decoded must be a bool mask of shape [{n}], got "
                             f"{np.shape(self.decoded)}.")
        if h != w:
            raise ValueError(f"ImageDataset {self.name!r}: images are {h}x{w}, but EDM needs square images.")
        for field, actual in (("resolution", h), ("channels", c)):
            given = getattr(self, field)
            if given is None:
                object.__setattr__(self, field, int(actual))
            elif int(given) != actual:
                raise ValueError(f"ImageDataset {self.name!r}: {field}={given} does not match the images "
                                 f"{images.shape}.")
        labels = self.labels
        if labels is None:
            if self.label_dim:
                raise ValueError(f"ImageDataset {self.name!r}: label_dim={self.label_dim} but there are no labels.")
            object.__setattr__(self, "label_dim", 0)
            return
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"ImageDataset {self.name!r}: labels must be integers of shape [{n}], got "
                             f"{labels.dtype} {labels.shape}.")
        labels = labels.astype(np.int64, copy=False)
        if labels.min() < 0:
            raise ValueError(f"ImageDataset {self.name!r}: labels must be non-negative class indices.")
        needed = int(labels.max()) + 1
        if self.label_dim is None:
            object.__setattr__(self, "label_dim", needed)
        elif int(self.label_dim) < needed:
            raise ValueError(f"ImageDataset {self.name!r}: label_dim={self.label_dim} is smaller than the "
                             f"largest label + 1 = {needed}.")
        else:
            object.__setattr__(self, "label_dim", int(self.label_dim))
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, images={self.images.shape} uint8, "
                f"label_dim={self.label_dim}, labelled={self.labels is not None})")


def _readonly(a: np.ndarray | None) -> np.ndarray | None:
    """Marks a loader-owned array read-only, so the shared dataset cannot be changed by a consumer."""
    if a is not None:
        a.setflags(write=False)
    return a


def _subset_indices(n: int, max_size: int | None, seed: int = 0) -> np.ndarray:
    """The reference's `max_size` rule: all of range(n), or a sorted random subset of `max_size` indices
    (`np.random.RandomState(seed).shuffle`, then the first `max_size`, sorted), int64."""
    idx = np.arange(n, dtype=np.int64)
    if max_size is not None:
        if int(max_size) < 1:
            raise ValueError(f"max_size must be a positive number of images or None, got {max_size}.")
        if n > max_size:
            np.random.RandomState(seed % (1 << 31)).shuffle(idx)
            idx = np.sort(idx[:int(max_size)])
    return idx


def _apply_max_size_and_labels(ds: ImageDataset, max_size: int | None, use_labels: bool) -> ImageDataset:
    """Applies `max_size` (reference rule) and `use_labels=False` to an already decoded dataset."""
    idx = _subset_indices(len(ds), max_size)
    labels = ds.labels if use_labels else None
    if idx.size == len(ds) and labels is ds.labels:
        return ds
    images = ds.images if idx.size == len(ds) else _readonly(ds.images[idx])
    if labels is not None and idx.size != len(ds):
        labels = _readonly(labels[idx])
    return ImageDataset(images=images, labels=labels, label_dim=ds.label_dim if labels is not None else 0,
                        name=ds.name)


# ------------------------------------------------------------------------------------------------------
# Reference-format datasets: a zip or folder of images plus optional dataset.json (dataset_tool.py).

class _Archive:
    """Read access to the files of a dataset zip or folder, by '/'-separated relative name."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"Dataset path {self.path} does not exist; set data.path to a reference-format "
                                    "zip or folder of images (e.g. ../shared/data/cifar10-jpeg-train.zip).")
        self.is_dir = os.path.isdir(self.path)
        if self.is_dir:
            root = self.path
            self.names = {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                          for d, _, files in os.walk(root) for f in files}
        else:
            if os.path.splitext(self.path)[1].lower() != ".zip":
                raise ValueError(f"Dataset path {self.path} is neither a folder nor a .zip file; point data.path "
                                 "at a reference-format zip or folder of images.")
            # One handle for all threads: reading a 50k-member zip's directory takes ~0.5 s, and
            # ZipFile.open() gives each member its own position on the shared file under a lock
            # (zipfile._SharedFile), so concurrent reads of different members are safe. The file object is
            # ours (ZipFile never closes a passed-in file), which keeps ZipFile's unsynchronised open-member
            # reference count out of the picture.
            self._file = open(self.path, "rb")
            try:
                self._zip = zipfile.ZipFile(self._file)
            except zipfile.BadZipFile as e:
                self._file.close()
                raise ValueError(f"Dataset zip {self.path} is not a readable zip file ({e}).") from None
            self.names = set(self._zip.namelist())

    def read(self, name: str) -> bytes:
        """The bytes of one member (safe to call from several threads)."""
        if self.is_dir:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC-32, cut or garbled data
            raise ValueError(f"Dataset zip {self.path}: member {name} is damaged ({e}); re-create the zip or "
                             "restore it from its source.") from None

    def close(self):
        if not self.is_dir:
            self._zip.close()
            self._file.close()


def _image_names(archive: _Archive) -> list[str]:
    """Image members sorted as in the reference (`sorted(...)` over names with a PIL image extension)."""
    extensions = PIL.Image.registered_extensions()
    names = sorted(n for n in archive.names if os.path.splitext(n)[1].lower() in extensions)
    if not names:
        raise ValueError(f"Dataset {archive.path} contains no image files (png, jpg, webp, ...); point data.path "
                         "at a folder or zip made by the reference dataset_tool.py.")
    return names


def _labels_from_json(archive: _Archive, names: list[str]) -> np.ndarray | None:
    """int64 [len(names)] labels from the archive's top-level dataset.json, aligned with `names`, or None
    when there is no dataset.json or it says `{"labels": null}`."""
    if "dataset.json" not in archive.names:
        return None
    where = f"{archive.path}/dataset.json" if archive.is_dir else f"dataset.json in {archive.path}"
    try:
        meta = json.loads(archive.read("dataset.json"))
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f'{where} must be an object with a "labels" entry: {{"labels": [[file, class], ...]}} '
                         'or {"labels": null}.')
    entries = meta["labels"]
    if entries is None:
        return None
    try:
        table = {str(fname).replace("\\", "/"): label for fname, label in entries}
    except (TypeError, ValueError):
        raise ValueError(f'{where}: "labels" must be a list of [file, class] pairs.') from None
    name_set = set(names)
    stray = sorted(set(table) - name_set)
    if stray:
        raise ValueError(f"{where} names {len(stray)} file(s) missing from the dataset, e.g. {stray[0]!r}; "
                         "restore the missing files or remove their entries.")
    unlabelled = [n for n in names if n not in table]
    if unlabelled:
        raise ValueError(f"{where} has no label for {len(unlabelled)} image(s), e.g. {unlabelled[0]!r}; "
                         "add their entries or remove dataset.json for an unlabelled dataset.")
    values = [table[n] for n in names]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = next(v for v in values if not (isinstance(v, int) and not isinstance(v, bool)))
        raise ValueError(f"{where} holds a non-integer label {bad!r}; edm-jax supports integer class labels only.")
    labels = np.asarray(values, dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(f"{where} holds a negative label {int(labels.min())}; class labels must be >= 0.")
    return labels


def read_labels(path: str | os.PathLike) -> np.ndarray | None:
    """Reads only dataset.json of a reference-format zip/folder (no image is decoded).

    Returns int64 [N] labels aligned with the dataset's sorted image names (the order of
    `load_image_dataset(path).images`), or None for an unlabelled dataset. Cheap: use it to inspect class
    counts of a large dataset.
    """
    archive = _Archive(path)
    try:
        return _labels_from_json(archive, _image_names(archive))
    finally:
        archive.close()


def _open_image(data: bytes, name: str) -> PIL.Image.Image:
    """PIL image of the bytes, trying the format its extension names first: PIL's format sniffing
    otherwise runs several plugins' parsers per file, which doubles the decode time of small images."""
    fmt = PIL.Image.registered_extensions().get(os.path.splitext(name)[1].lower())
    if fmt is not None:
        try:
            return PIL.Image.open(io.BytesIO(data), formats=[fmt])
        except PIL.UnidentifiedImageError:  # content does not match the extension
            pass
    return PIL.Image.open(io.BytesIO(data))


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes one image file to uint8 [H, W, C]. L → C=1, RGB → 3 (LA, RGBA keep their 2/4 channels);
    palette and 1-bit images are expanded; 16-bit or float images are refused rather than truncated."""
    try:
        with _open_image(data, name) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
            elif mode == "1":
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                raise ValueError(f"image {name} has pixel mode {mode} (not 8 bits per channel); convert the "
                                 "dataset to 8-bit RGB or L images.")
            array = np.asarray(im)
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"image {name} could not be decoded ({e}).") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def load_image_dataset(path: str | os.PathLike, *, max_size: int | None = None, use_labels: bool = True,
                       num_threads: int | None = None,
                       only: Callable[[int], np.ndarray] | None = None) -> ImageDataset:
    """Loads a reference-format dataset (zip or folder of images + optional dataset.json) into memory.

    The format is what NVlabs/edm's dataset_tool.py writes: images named `00000/img00000000.png` (any PIL
    format: png, jpg, webp, ...) and `dataset.json` = `{"labels": [[file, class], ...]}` or `{"labels": null}`.
    Images are sorted by name as in the reference; `max_size` keeps the reference's random subset
    (seed 0, original order) and only those images are decoded. `label_dim` is max label + 1 over the
    whole dataset (the reference's `label_shape`), so a subset keeps the full label width.

    Decoding runs on a thread pool (`num_threads`, default min(8, CPUs)). PIL releases the GIL only
    while decoding pixels; for tiny images its Python header parsing dominates, so the gain is small
    (the 50k-image CIFAR-10 JPEG zip takes about 13-15 s on 2 cores with 1 or 2 threads, ~0.25 ms per
    image). Every image must be square and of one size and channel count.

    `only(N)` -> int [K], indices into the N images kept after `max_size`: decode just these — the ones
    this host's training batches read (`host_indices`), so that P hosts share the decoding instead of each
    decoding everything. The others stay zero (pages the OS never backs) and `decoded` marks which hold
    pixels; labels are read for all.

    Returns:
      ImageDataset with images uint8 [N, H, W, C] (read-only), labels int64 [N] (read-only) or None, and
      `decoded` (bool [N]) when `only` is given.
    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: no images, non-square or mixed-size images, undecodable images, or a dataset.json that
        is malformed, names missing files or misses images.
    """
    archive = _Archive(path)
    try:
        names = _image_names(archive)
        labels = _labels_from_json(archive, names) if use_labels else None
        label_dim = int(labels.max()) + 1 if labels is not None else 0
        keep = _subset_indices(len(names), max_size)
        names = [names[i] for i in keep]
        if labels is not None:
            labels = labels[keep]

        todo = np.arange(len(names)) if only is None else np.unique(np.asarray(only(len(names)), np.int64))
        if todo.size == 0 or todo[0] < 0 or todo[-1] >= len(names):
            raise ValueError(f"Dataset {archive.path}: only(N) must return at least one image index, all in "
                             f"[0, {len(names)}).")
        first_name = names[todo[0]]
        first = _decode_image(archive.read(first_name), first_name)
        h, w, c = first.shape
        if h != w:
            raise ValueError(f"Dataset {archive.path}: image {first_name} is {w}x{h}, but EDM needs square images; "
                             "crop or resize them (dataset_tool.py --resolution, --transform=center-crop).")
        # zeros, not empty: with `only`, the pages of images never decoded are never touched (never resident).
        images = (np.empty if only is None else np.zeros)((len(names), h, w, c), np.uint8)
        images[todo[0]] = first

        def decode_range(start: int, stop: int):
            for i in todo[start:stop]:
                image = _decode_image(archive.read(names[i]), names[i])
                if image.shape != first.shape:
                    raise ValueError(f"Dataset {archive.path}: image {names[i]} is {image.shape[1]}x{image.shape[0]}"
                                     f" with {image.shape[2]} channel(s) but {first_name} is {w}x{h} with {c}; all "
                                     "images must have the same size and channel count.")
                images[i] = image

        threads = max(1, num_threads or min(8, os.cpu_count() or 1))
        chunk = 256
        ranges = [(s, min(s + chunk, todo.size)) for s in range(1, todo.size, chunk)]
        if threads == 1 or len(ranges) <= 1:
            for r in ranges:
                decode_range(*r)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="edm-jax-decode") as pool:
                futures = [pool.submit(decode_range, *r) for r in ranges]
                try:
                    for f in futures:  # in order, so the first bad image (by name) is the one reported
                        f.result()
                finally:
                    for f in futures:
                        f.cancel()
    except ValueError as e:
        if str(e).startswith("image "):
            raise ValueError(f"Dataset {archive.path}: {e}") from None
        raise
    finally:
        archive.close()
    name = os.path.splitext(os.path.basename(os.path.abspath(archive.path)))[0]
    decoded = None
    if only is not None:
        decoded = np.zeros(len(names), bool)
        decoded[todo] = True
    return ImageDataset(images=_readonly(images), labels=_readonly(labels), label_dim=label_dim, name=name,
                        decoded=_readonly(decoded))


# ------------------------------------------------------------------------------------------------------
# Built-in synthetic dataset.

SYNTHETIC_SHAPES = ("disc", "square", "ring", "stripes")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB, all in [0, 1]; [N] each → [N, 3]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(x, -1) for x in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(h.size)]


def synthetic_dataset(n: int = 4096, resolution: int = 16, channels: int = 3, num_classes: int = 4,
                      seed: int = 0) -> ImageDataset:
    """The built-in offline dataset: one bright anti-aliased shape on a plain dark background per image.

    Classes (label k = the k-th shape; `num_classes` ≤ 4 uses the first `num_classes` shapes):
      0 disc     a filled circle of radius 0.18–0.32·R at a random position (fully inside the image);
      1 square   an axis-aligned filled square of half-side 0.85× that radius;
      2 ring     a circle outline of the same radius, about 0.35·radius thick (≥ 1.5 px);
      3 stripes  parallel bars over the whole image, horizontal or vertical, period 0.25–0.45·R, random phase.
    Foreground colours are saturated random hues (HSV s ∈ [0.6, 1], v ∈ [0.75, 1]); backgrounds are dark
    (each channel in [0, 0.3]). With `channels` ≠ 3 each channel is drawn independently (foreground
    [0.6, 1], background [0, 0.3]), so grayscale images keep the same contrast. Edges are anti-aliased by
    pixel coverage of the signed distance, so the images are smooth, low-entropy and easy to judge by eye:
    a small diffusion model learns them within minutes on a CPU.

    Classes are exactly balanced (counts differ by at most one) and shuffled. With `num_classes=0` the
    dataset is unlabelled and mixes all four shapes. Deterministic in (n, resolution, channels,
    num_classes, seed): all parameters come from one `np.random.default_rng(seed)`.

    Returns:
      ImageDataset: images uint8 [n, resolution, resolution, channels], labels int64 [n] (None when
      num_classes is 0), label_dim = num_classes.
    """
    if n < 1 or resolution < 4 or channels < 1:
        raise ValueError(f"synthetic_dataset needs n >= 1, resolution >= 4 and channels >= 1, got n={n}, "
                         f"resolution={resolution}, channels={channels}.")
    if not 0 <= num_classes <= len(SYNTHETIC_SHAPES):
        raise ValueError(f"synthetic_dataset has {len(SYNTHETIC_SHAPES)} shape classes "
                         f"{SYNTHETIC_SHAPES}; num_classes={num_classes} is out of range [0, 4].")
    rng = np.random.default_rng(seed)
    kinds = num_classes or len(SYNTHETIC_SHAPES)
    shape_ids = rng.permutation(np.arange(n) % kinds)
    res = float(resolution)
    radius = rng.uniform(0.18, 0.32, n) * res
    cx = radius + 0.5 + rng.random(n) * (res - 2 * radius - 1)
    cy = radius + 0.5 + rng.random(n) * (res - 2 * radius - 1)
    period = rng.uniform(0.25, 0.45, n) * res
    phase = rng.random(n) * period
    vertical = rng.random(n) < 0.5
    if channels == 3:
        fg = _hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.75, 1.0, n))
    else:
        fg = rng.uniform(0.6, 1.0, (n, channels))
    bg = rng.uniform(0.0, 0.3, (n, channels))

    images = np.empty((n, resolution, resolution, channels), np.uint8)
    grid = np.arange(resolution, dtype=np.float64) + 0.5  # pixel centres
    x, y = grid[None, None, :], grid[None, :, None]
    for s in range(0, n, 512):
        e = min(s + 512, n)
        dx = x - cx[s:e, None, None]
        dy = y - cy[s:e, None, None]
        r = radius[s:e, None, None]
        dist = np.hypot(dx, dy)
        u = np.where(vertical[s:e, None, None], x, y)
        t = np.mod(u - phase[s:e, None, None], period[s:e, None, None])
        p = period[s:e, None, None]
        signed = np.select(  # signed distance to the shape's edge in pixels, negative inside
            [shape_ids[s:e, None, None] == k for k in range(4)],
            [dist - r,
             np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r,
             np.abs(dist - r) - 0.5 * np.maximum(1.5, 0.35 * r),
             np.abs(t - 0.5 * p) - 0.25 * p])
        cover = np.clip(0.5 - signed, 0.0, 1.0)[..., None]  # pixel coverage: anti-aliased edges
        pixels = bg[s:e, None, None, :] * (1 - cover) + fg[s:e, None, None, :] * cover
        images[s:e] = np.rint(pixels * 255.0)
    labels = shape_ids.astype(np.int64) if num_classes else None
    return ImageDataset(images=_readonly(images), labels=_readonly(labels), label_dim=num_classes,
                        name=f"synthetic-shapes-{resolution}x{resolution}")


# ------------------------------------------------------------------------------------------------------
# TFDS.

def _one_line(e: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened (TFDS errors can list every dataset it knows)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_tfds(name: str, *, split: str = "train", data_dir: str | None = None,
              download: bool = False) -> ImageDataset:
    """Loads a TFDS image dataset (e.g. "cifar10") into memory; `tensorflow_datasets` is imported here.

    The dataset must already be prepared under `data_dir` (TFDS's default ~/tensorflow_datasets when
    None). Nothing is downloaded unless `download=True`, so an offline machine fails at once with a
    `DatasetUnavailableError` instead of retrying downloads. Reading prefers TFDS's random-access data
    source (array_record / parquet, no TensorFlow needed) and falls back to `as_dataset` for tfrecord data
    (which needs TensorFlow). Examples must have an "image" feature of one fixed size; a "label"
    `ClassLabel` feature, if present, gives labels and `label_dim = num_classes`.

    Returns:
      ImageDataset: images uint8 [N, H, W, C], labels int64 [N] or None.
    Raises:
      DatasetUnavailableError: package missing, unknown name, not prepared, download or read failed.
    """
    def unavailable(reason: str) -> DatasetUnavailableError:
        return DatasetUnavailableError(f"TFDS dataset {name!r} (split {split!r}) could not be loaded because "
                                       f"{reason}; {_LOCAL_COPY_HINT}.")

    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise unavailable("the tensorflow_datasets package is not installed "
                          "(pip install tensorflow-datasets)") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad config, unreadable data_dir, ...
        raise unavailable(f"tfds.builder failed ({_one_line(e)})") from e
    try:
        prepared = bool(builder.is_prepared())
    except Exception:  # older TFDS without is_prepared()
        prepared = os.path.exists(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))
    if not prepared and download:
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise unavailable(f"downloading and preparing it failed ({_one_line(e)})") from e
        prepared = True
    try:
        images, labels = _read_tfds(tfds, builder, split)
    except DatasetUnavailableError:
        raise
    except ImportError as e:
        raise unavailable(f"reading its tfrecord files needs TensorFlow ({_one_line(e)}); pip install "
                          "tensorflow or prepare it with file_format='array_record'") from e
    except Exception as e:
        if not prepared:
            raise unavailable(f"it is not prepared in {builder.data_dir} and download=False (this machine may "
                              "be offline)") from e
        raise unavailable(f"reading it failed ({_one_line(e)})") from e

    features = builder.info.features
    label_feature = features["label"] if "label" in features.keys() else None
    label_dim = int(getattr(label_feature, "num_classes", 0) or 0)
    if labels is not None and label_dim == 0:
        label_dim = int(labels.max()) + 1
    if labels is None:
        label_dim = 0
    return ImageDataset(images=_readonly(images), labels=_readonly(labels), label_dim=label_dim, name=name)


def _read_tfds(tfds: Any, builder: Any, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """All examples of one split as (uint8 [N, H, W, C], int64 [N] or None)."""
    def fail(reason: str) -> DatasetUnavailableError:
        return DatasetUnavailableError(f"TFDS dataset {builder.name!r} (split {split!r}) could not be used "
                                       f"because {reason}; {_LOCAL_COPY_HINT}.")

    images, labels = [], []

    def add(example: Mapping[str, Any], batched: bool):
        if "image" not in example:
            raise fail(f"its examples have no 'image' feature (features: {sorted(example)})")
        image = np.asarray(example["image"])
        if not batched:
            image = image[None]
        if image.ndim == 3:  # [B, H, W] grayscale without a channel axis
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 4:
            raise fail(f"its images are {image.dtype} {image.shape[1:]}, not uint8 [H, W, C]")
        if images and image.shape[1:] != images[0].shape[1:]:
            raise fail(f"its images vary in size ({images[0].shape[1:]} and {image.shape[1:]}); make a "
                       "fixed-size reference-format zip with dataset_tool.py instead")
        images.append(image)
        if "label" in example:
            labels.append(np.asarray(example["label"], np.int64).reshape(image.shape[0]))

    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:  # tfrecord-format data has no random access: read through tf.data
        source = None
    if source is not None:
        for i in range(len(source)):
            add(source[i], batched=False)
    else:
        for batch in tfds.as_numpy(builder.as_dataset(split=split, batch_size=1024, shuffle_files=False)):
            add(batch, batched=True)
    if not images:
        raise fail("the split is empty")
    if labels and len(labels) != len(images):
        raise fail("only some of its examples have a 'label'")
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


# ------------------------------------------------------------------------------------------------------
# Dispatch.

def load_dataset_spec(spec: str, *, use_labels: bool = False) -> ImageDataset:
    """A dataset named in one string, as the command line's --data: 'tfds:<name>' (TFDS, its train split)
    or a path (a reference-format zip or folder, `source='auto'`)."""
    if spec.startswith("tfds:"):
        return load_dataset(source="tfds", tfds_name=spec[len("tfds:"):])
    return load_dataset(source="auto", path=spec, use_labels=use_labels)


def load_dataset(*, source: str, path: str | None = None, tfds_name: str | None = None,
                 tfds_data_dir: str | None = None, synthetic: Mapping[str, Any] | None = None,
                 max_size: int | None = None, use_labels: bool = True, tfds_split: str = "train",
                 tfds_download: bool = False, only: Callable[[int], np.ndarray] | None = None) -> ImageDataset:
    """Loads the dataset a config describes.

    Args:
      source: "zip" or "folder" (`path`, reference format), "tfds" (`tfds_name`, `tfds_data_dir`,
        `tfds_split`, `tfds_download`), "synthetic" (`synthetic`: keyword arguments of `synthetic_dataset`,
        None for its defaults), or "auto": `path` if given (zip or folder by what it is), else
        `tfds_name`, else the synthetic set if `synthetic` is given.
      max_size: keep a random subset of at most this many images (the reference's rule, seed 0).
      use_labels: False drops the labels (unconditional training; label_dim 0).
      only: zip/folder sources decode just the indices `only(N)` returns (`load_image_dataset`); TFDS and
        the synthetic set are built whole, and ignore it.
    Returns:
      ImageDataset (see `ImageDataset`).
    """
    sources = ("auto", "zip", "folder", "tfds", "synthetic")
    if source not in sources:
        raise ValueError(f"Unknown data source {source!r}; set data.source to one of {', '.join(sources)}.")
    if source == "auto":
        if path:
            source = "folder" if os.path.isdir(path) else "zip"
        elif tfds_name:
            source = "tfds"
        elif synthetic is not None:
            source = "synthetic"
        else:
            raise ValueError("data.source is 'auto' but none of data.path, data.tfds_name or data.synthetic is set; "
                             "set one of them.")
    if path and source in ("tfds", "synthetic"):
        raise ValueError(f"data.path={path!r} is set but data.source is {source!r}, which does not read it; set "
                         "data.source='auto' to train on data.path, or leave data.path unset")
    if source in ("zip", "folder"):
        if not path:
            raise ValueError(f"data.source is {source!r} but data.path is not set; point it at a reference-format "
                             f"{source} (e.g. ../shared/data/cifar10-jpeg-train.zip).")
        if os.path.exists(path) and os.path.isdir(path) != (source == "folder"):
            raise ValueError(f"data.source is {source!r} but data.path {path} is "
                             f"{'a folder' if os.path.isdir(path) else 'not a folder'}; set data.source to "
                             f"{'folder' if os.path.isdir(path) else 'zip'} or 'auto'.")
        return load_image_dataset(path, max_size=max_size, use_labels=use_labels, only=only)
    if source == "tfds":
        if not tfds_name:
            raise ValueError("data.source is 'tfds' but data.tfds_name is not set; set it (e.g. 'cifar10').")
        ds = load_tfds(tfds_name, split=tfds_split, data_dir=tfds_data_dir, download=tfds_download)
    else:
        kwargs = synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic or {})
        ds = synthetic_dataset(**kwargs)
    return _apply_max_size_and_labels(ds, max_size, use_labels)


# ------------------------------------------------------------------------------------------------------
# Batches: deterministic by (seed, step), host-sharded, prefetched.

@functools.lru_cache(maxsize=8)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Epoch `epoch`'s permutation (int64 [N], from `default_rng([seed, epoch])`) and its x-flip coins
    (bool [N], from `default_rng([seed, epoch, 1])`, one per stream position). Cached, read-only."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    flips = np.random.default_rng([seed, epoch, 1]).random(num_examples) < 0.5
    return _readonly(order), _readonly(flips)


def batch_indices(num_examples: int, step: int, *, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Which examples this host reads at `step`, and which of them are x-flipped if x-flips are on.

    The stream is the concatenation of per-epoch permutations of range(N); the global batch of step s is
    stream positions [s·B, (s+1)·B), and host p of P takes the contiguous part [p·B/P, (p+1)·B/P) of it.
    A batch may straddle an epoch boundary (and span several epochs when B > N).

    Returns:
      (indices int64 [B/P] into the dataset, flips bool [B/P]): a pure function of the arguments.
    """
    local = global_batch // process_count
    return _at_positions(num_examples, seed, step * global_batch + process_index * local + np.arange(local))


def _at_positions(num_examples: int, seed: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int64, x-flip coin bool) of each stream position in `pos` (int [K])."""
    epochs, offsets = np.divmod(np.asarray(pos, np.int64), num_examples)
    indices = np.empty(epochs.shape, np.int64)
    flips = np.empty(epochs.shape, bool)
    for epoch in np.unique(epochs):
        order, coins = _epoch_order(num_examples, seed, int(epoch))
        sel = epochs == epoch
        indices[sel] = order[offsets[sel]]
        flips[sel] = coins[offsets[sel]]
    return indices, flips


def host_indices(num_examples: int, stop_step: int, *, global_batch: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """The distinct dataset indices (sorted int64 [K]) host p reads in steps [start_step, stop_step): what
    it has to decode. Within one epoch the hosts' sets are disjoint and together the epoch's images read;
    a run of many epochs needs (nearly) all of them on every host. Stops scanning once all are needed."""
    needed = np.zeros(num_examples, bool)
    local = global_batch // process_count
    chunk = max(1, (1 << 20) // max(local, 1))  # steps per scan: about a million positions
    for first in range(int(start_step), int(stop_step), chunk):
        steps = np.arange(first, min(first + chunk, int(stop_step)), dtype=np.int64)
        pos = steps[:, None] * global_batch + process_index * local + np.arange(local, dtype=np.int64)
        needed[_at_positions(num_examples, seed, pos.ravel())[0]] = True
        if needed.all():
            break
    return np.flatnonzero(needed)


def _make_batch(images: np.ndarray, labels: np.ndarray | None, label_dim: int, step: int, *, global_batch: int,
                seed: int, process_index: int, process_count: int, xflip: bool,
                decoded: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This host's batch for `step`: images float32 [B/P, H, W, C] = x/127.5 − 1, labels float32 one-hot
    [B/P, label_dim] (label_dim 0 when `labels` is None)."""
    idx, flips = batch_indices(len(images), step, global_batch=global_batch, seed=seed,
                               process_index=process_index, process_count=process_count)
    if decoded is not None and not decoded[idx].all():
        raise ValueError(f"step {step} reads image {int(idx[~decoded[idx]][0])}, which this host did not decode; "
                         "load the dataset with only=host_indices(...) covering every step it trains")
    pixels = images[idx]  # uint8 gather (a copy); flipping before the float conversion moves 4× less
    if xflip and flips.any():
        pixels[flips] = pixels[flips][:, :, ::-1]
    out = np.empty(pixels.shape, np.float32)
    np.divide(pixels, np.float32(127.5), out=out)
    out -= np.float32(1.0)
    onehot = np.zeros((idx.size, label_dim if labels is not None else 0), np.float32)
    if labels is not None:
        onehot[np.arange(idx.size), labels[idx]] = 1.0
    return {"images": out, "labels": onehot}


def _produce(make: Any, step: int, out: queue.Queue, stop: threading.Event):
    """Background producer: puts (step, batch) forever, or (None, exception) once on failure. Holds no
    reference to the `Batches` object, so dropping the iterator lets it be collected (and stopped)."""
    try:
        while not stop.is_set():
            item = (step, make(step))
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            step += 1
    except BaseException as e:  # handed to the consumer, which raises it with context
        while not stop.is_set():
            try:
                out.put((None, e), timeout=0.05)
                return
            except queue.Full:
                continue


class Batches:
    """Iterator of training batches with background prefetching; create it with `batches(...)`.

    `next()` returns dict(images=float32 [B/P, H, W, C] in [-1, 1], labels=float32 [B/P, label_dim]).
    `step` is the step of the batch `next()` will return: the data position to checkpoint. `batch(step)`
    builds any step's batch synchronously (the same arrays the iterator yields). Close it with `close()`
    or a `with` block; the producer is a daemon thread, so it never blocks interpreter exit either.
    """

    def __init__(self, dataset: ImageDataset, *, global_batch: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1, xflip: bool = False, use_labels: bool = True,
                 prefetch: int = 2):
        self._closed = True  # until fully constructed (for __del__)
        for arg, value, low in (("global_batch", global_batch, 1), ("process_count", process_count, 1),
                                ("seed", seed, 0), ("start_step", start_step, 0), ("prefetch", prefetch, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"batches: {arg} must be an integer >= {low}, got {value!r}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"batches: process_index {process_index} is outside [0, process_count={process_count}).")
        if global_batch % process_count:
            raise ValueError(f"Global batch size {global_batch} is not divisible by the {process_count} processes "
                             f"(hosts); set train.batch_size to a multiple of {process_count}.")
        labels = dataset.labels if use_labels else None
        self._make = functools.partial(
            _make_batch, dataset.images, labels, dataset.label_dim if labels is not None else 0,
            global_batch=int(global_batch), seed=int(seed), process_index=int(process_index),
            process_count=int(process_count), xflip=bool(xflip), decoded=dataset.decoded)
        self._step = int(start_step)
        self._queue: queue.Queue = queue.Queue(maxsize=int(prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(self._make, self._step, self._queue, self._stop),
                                        name="edm-jax-batches", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def step(self) -> int:
        """Step of the next batch `next()` returns (resume with `start_step=step`)."""
        return self._step

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch for `step`, built synchronously (same values the iterator yields)."""
        return self._make(int(step))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        while True:
            try:
                step, item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    self.close()
                    raise RuntimeError("The batch prefetch thread stopped unexpectedly.") from None
        if step is None:
            self.close()
            raise RuntimeError(f"Building the batch for step {self._step} failed: {item}") from item
        self._step = step + 1
        return item

    def close(self):
        """Stops the producer thread (idempotent); `next()` afterwards raises StopIteration."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def batches(dataset: ImageDataset, *, global_batch: int, seed: int, start_step: int = 0, process_index: int = 0,
            process_count: int = 1, xflip: bool = False, use_labels: bool = True, prefetch: int = 2) -> Batches:
    """Infinite, deterministic, host-sharded training batches, prefetched on a background thread.

    Step s's global batch is positions [s·B, (s+1)·B) of the stream "permutation of epoch 0, then of epoch
    1, ...", epoch e's permutation drawn from `np.random.default_rng([seed, e])` (see `batch_indices`).
    Host `process_index` of `process_count` gets rows [p·B/P, (p+1)·B/P) of it, so each host reads only
    its shard, and `jax.make_array_from_process_local_data` reassembles the global batch. Starting at
    `start_step` yields exactly what an uninterrupted run yields from that step: checkpoint the step only.

    With `xflip=True` each stream position carries a fair coin (from `default_rng([seed, e, 1])`) and the
    image is mirrored left-right when it lands heads — the reference's dataset doubling (`--xflip`),
    without changing the epoch length. Labels are dropped (width 0) when `use_labels` is False or the
    dataset is unlabelled.

    Yields:
      dict(images=float32 [B/P, H, W, C] = uint8/127.5 − 1 in [−1, 1],
           labels=float32 [B/P, label_dim] one-hot, [B/P, 0] when unconditional).
    Raises:
      ValueError: global_batch not divisible by process_count, or a bad argument.
    """
    return Batches(dataset, global_batch=global_batch, seed=seed, start_step=start_step, process_index=process_index,
                   process_count=process_count, xflip=xflip, use_labels=use_labels, prefetch=prefetch)
