"""Tests for edm_jax.data: reference-format loading, synthetic set, TFDS errors/mocks, batch stream."""

import json
import pathlib
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import pytest

from edm_jax import data

CIFAR_ZIP = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.zip"
needs_cifar = pytest.mark.skipif(not CIFAR_ZIP.exists(), reason=f"{CIFAR_ZIP} is not present")


# ------------------------------------------------------------------------------------------------------
# Reference-format datasets.

@needs_cifar
def test_cifar_zip_subset_with_labels():
    ds = data.load_image_dataset(CIFAR_ZIP, max_size=300)
    assert ds.images.shape == (300, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (300,) and ds.labels.dtype == np.int64
    assert (ds.resolution, ds.channels, ds.label_dim, ds.name) == (32, 3, 10, "cifar10-jpeg-train")
    # The subset is the reference's: RandomState(0) shuffle, first max_size, sorted.
    idx = np.arange(50000)
    np.random.RandomState(0).shuffle(idx)
    idx = np.sort(idx[:300])
    all_labels = data.read_labels(CIFAR_ZIP)
    np.testing.assert_array_equal(ds.labels, all_labels[idx])
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        i = 7
        name = f"{idx[i] // 1000:05d}/img{idx[i]:08d}.jpg"
        with z.open(name) as f:
            np.testing.assert_array_equal(ds.images[i], np.asarray(PIL.Image.open(f)))


@needs_cifar
def test_cifar_label_counts_from_dataset_json():
    labels = data.read_labels(CIFAR_ZIP)  # reads dataset.json only
    assert labels.shape == (50000,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [5000] * 10)


def _write_images(root, arrays, ext="png"):
    names = []
    for i, a in enumerate(arrays):
        name = f"{i // 1000:05d}/img{i:08d}.{ext}"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(a).save(path)
        names.append(name)
    return names


def test_folder_and_zip_with_dataset_json(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    root = tmp_path / "mini"
    names = _write_images(root, arrays)
    labels = [3, 0, 2, 3, 1]
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, l] for n, l in zip(names, labels)]}))
    ds = data.load_image_dataset(root)
    np.testing.assert_array_equal(ds.images, arrays)
    np.testing.assert_array_equal(ds.labels, labels)
    assert (ds.label_dim, ds.resolution, ds.channels, ds.name) == (4, 8, 3, "mini")
    # The same files zipped load identically.
    with zipfile.ZipFile(tmp_path / "mini.zip", "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    dz = data.load_image_dataset(tmp_path / "mini.zip")
    np.testing.assert_array_equal(dz.images, arrays)
    np.testing.assert_array_equal(dz.labels, labels)
    # use_labels=False drops them; so does {"labels": null}.
    assert data.load_image_dataset(root, use_labels=False).labels is None
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    ds = data.load_image_dataset(root)
    assert ds.labels is None and ds.label_dim == 0


def test_folder_without_dataset_json_grayscale(tmp_path):
    arrays = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    _write_images(tmp_path, arrays)
    ds = data.load_image_dataset(tmp_path)
    assert ds.images.shape == (3, 4, 4, 1) and ds.channels == 1
    np.testing.assert_array_equal(ds.images[..., 0], arrays)
    assert ds.labels is None and ds.label_dim == 0


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_dataset(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        data.load_image_dataset(tmp_path / "empty")

    mixed = tmp_path / "mixed"
    _write_images(mixed, [np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="img00000001.png is 4x4.*same size"):
        data.load_image_dataset(mixed)

    wide = tmp_path / "wide"
    _write_images(wide, [np.zeros((4, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="square"):
        data.load_image_dataset(wide)

    bad = tmp_path / "bad"
    names = _write_images(bad, [np.zeros((4, 4, 3), np.uint8)] * 2)
    (bad / "dataset.json").write_text(json.dumps({"labels": [[names[0], 0], [names[1], 1],
                                                             ["00000/img00000002.png", 1]]}))
    with pytest.raises(ValueError, match="names 1 file.*missing from the dataset.*'00000/img00000002.png'"):
        data.load_image_dataset(bad)
    (bad / "dataset.json").write_text(json.dumps({"labels": [[names[0], 0]]}))
    with pytest.raises(ValueError, match="no label for 1 image.*img00000001.png"):
        data.load_image_dataset(bad)
    (bad / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_image_dataset(bad)


# ------------------------------------------------------------------------------------------------------
# Synthetic dataset.

def test_synthetic_deterministic_and_balanced():
    a = data.synthetic_dataset(n=203, resolution=16, num_classes=4, seed=5)
    b = data.synthetic_dataset(n=203, resolution=16, num_classes=4, seed=5)
    c = data.synthetic_dataset(n=203, resolution=16, num_classes=4, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (203, 16, 16, 3) and a.images.dtype == np.uint8
    assert (a.label_dim, a.resolution, a.channels) == (4, 16, 3)
    counts = np.bincount(a.labels, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 203
    # Every image has a plain background and a visible foreground: a wide pixel range.
    spread = a.images.max(axis=(1, 2, 3)).astype(int) - a.images.min(axis=(1, 2, 3))
    assert spread.min() > 80
    gray = data.synthetic_dataset(n=8, resolution=8, channels=1, num_classes=0)
    assert gray.images.shape == (8, 8, 8, 1) and gray.labels is None and gray.label_dim == 0


def test_load_dataset_dispatch(tmp_path):
    ds = data.load_dataset(source="synthetic", synthetic={"n": 20, "resolution": 8}, max_size=10, use_labels=False)
    assert ds.images.shape == (10, 8, 8, 3) and ds.labels is None and ds.label_dim == 0
    _write_images(tmp_path, np.zeros((2, 4, 4, 3), np.uint8))
    assert len(data.load_dataset(source="auto", path=str(tmp_path))) == 2
    with pytest.raises(ValueError, match="Unknown data source 'lmdb'"):
        data.load_dataset(source="lmdb")
    with pytest.raises(ValueError, match="data.path is not set"):
        data.load_dataset(source="zip")
    for source in ("synthetic", "tfds"):  # a path these sources would silently ignore
        with pytest.raises(ValueError, match=rf"data.path='x.zip' is set but data.source is '{source}', which does "
                                             "not read it; set data.source='auto'"):
            data.load_dataset(source=source, path="x.zip", tfds_name="cifar10", synthetic={"n": 4})


# ------------------------------------------------------------------------------------------------------
# TFDS.

def test_tfds_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    start = time.time()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_dataset(source="tfds", tfds_name="cifar10")
    assert time.time() - start < 5
    message = str(err.value)
    assert "'cifar10'" in message and "could not be loaded" in message and "not installed" in message
    assert "data.tfds_data_dir" in message and "data.path" in message and "cifar10-jpeg-train.zip" in message
    assert "\n" not in message
    assert isinstance(err.value, RuntimeError)


def test_tfds_unprepared_fails_fast_offline(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="tensorflow_datasets is not installed (CI installs it)")
    start = time.time()
    with pytest.raises(data.DatasetUnavailableError, match="not prepared in .*download=False.*data.tfds_data_dir"):
        data.load_tfds("cifar10", data_dir=str(tmp_path))
    assert time.time() - start < 10


def test_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets",
                               reason="tensorflow_datasets is not installed (CI installs it)")
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_tfds("cifar10", split="train")
    assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (12,) and ds.labels.dtype == np.int64
    assert ds.label_dim == 10 and ds.labels.max() < 10 and ds.name == "cifar10"


# ------------------------------------------------------------------------------------------------------
# Batches.

def _tagged_dataset(n=50, resolution=4, label_dim=5, seed=0):
    """Random images whose pixel [0, 0, 0] is the example index, so every row is identifiable."""
    images = np.random.default_rng(seed).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return data.ImageDataset(images=images, labels=np.arange(n) % label_dim, name="tagged")


def _take(it, k):
    with it:
        return [next(it) for _ in range(k)]


def _expected_stream(n, seed, epochs):
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])


def test_batches_values_and_one_hot():
    ds = _tagged_dataset()
    (b,) = _take(data.batches(ds, global_batch=16, seed=0), 1)
    assert b["images"].dtype == np.float32 and b["images"].shape == (16, 4, 4, 3)
    assert b["images"].min() >= -1 and b["images"].max() <= 1
    assert b["labels"].dtype == np.float32 and b["labels"].shape == (16, 5)
    idx = _expected_stream(50, 0, 1)[:16]
    np.testing.assert_array_equal(b["images"], ds.images[idx].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(b["labels"], np.eye(5, dtype=np.float32)[ds.labels[idx]])
    (u,) = _take(data.batches(ds, global_batch=16, seed=0, use_labels=False), 1)
    assert u["labels"].shape == (16, 0)


def test_batches_deterministic_resume_and_epoch_boundary():
    ds = _tagged_dataset(n=50)
    run = _take(data.batches(ds, global_batch=16, seed=3), 10)  # 160 positions: crosses 3 epoch boundaries
    again = _take(data.batches(ds, global_batch=16, seed=3), 10)
    other = _take(data.batches(ds, global_batch=16, seed=4), 1)
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(run[0]["images"], other[0]["images"])
    stream = _expected_stream(50, 3, 4)
    for s, b in enumerate(run):
        tags = np.rint((b["images"][:, 0, 0, 0] + 1) * 127.5).astype(int)
        np.testing.assert_array_equal(tags, stream[16 * s:16 * (s + 1)])
    # Step 3 straddles epochs 0 and 1; each epoch visits every example once.
    np.testing.assert_array_equal(np.sort(stream[:50]), np.arange(50))
    # Resuming at step 7 gives exactly the uninterrupted run's steps 7, 8, 9.
    it = data.batches(ds, global_batch=16, seed=3, start_step=7)
    assert it.step == 7
    resumed = _take(it, 3)
    for a, b in zip(run[7:], resumed):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert it.step == 10


def test_batches_host_slices_concatenate_to_global_batch():
    ds = _tagged_dataset(n=50)
    whole = _take(data.batches(ds, global_batch=24, seed=1, start_step=2, xflip=True), 3)
    parts = [_take(data.batches(ds, global_batch=24, seed=1, start_step=2, xflip=True, process_index=p,
                                process_count=2), 3) for p in range(2)]
    for s in range(3):
        assert parts[0][s]["images"].shape == (12, 4, 4, 3)
        for key in ("images", "labels"):
            np.testing.assert_array_equal(np.concatenate([parts[0][s][key], parts[1][s][key]]), whole[s][key])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.batches(ds, global_batch=16, seed=0, process_count=3)


def test_batches_xflip_flips_about_half_exactly():
    ds = _tagged_dataset(n=500, resolution=8)
    plain = np.concatenate([b["images"] for b in _take(data.batches(ds, global_batch=100, seed=2), 4)])
    flip = np.concatenate([b["images"] for b in _take(data.batches(ds, global_batch=100, seed=2, xflip=True), 4)])
    same = np.all(plain == flip, axis=(1, 2, 3))
    mirrored = np.all(plain[:, :, ::-1] == flip, axis=(1, 2, 3))
    assert np.all(same ^ mirrored)  # every image is either untouched or exactly mirrored (never both: noise)
    assert 0.4 < mirrored.mean() < 0.6


def test_batches_close():
    ds = _tagged_dataset()
    it = data.batches(ds, global_batch=8, seed=0)
    next(it)
    it.close()
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    first = _take(data.batches(ds, global_batch=8, seed=0), 1)[0]
    np.testing.assert_array_equal(it.batch(0)["images"], first["images"])  # batch(step) = what next() yields


def test_each_host_decodes_only_the_images_its_batches_read(tmp_path):
    arrays = np.random.default_rng(2).integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    root = tmp_path / "hosts"
    _write_images(root, arrays)
    kw = dict(global_batch=8, seed=5)
    # Steps 0-3 read 32 of the 40 stream positions of epoch 0: the two hosts' sets are disjoint halves.
    shares = [data.host_indices(40, 4, process_index=p, process_count=2, **kw) for p in range(2)]
    assert [s.size for s in shares] == [16, 16] and not set(shares[0]) & set(shares[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(_expected_stream(40, 5, 1)[:32]))
    # Past an epoch a host needs images of both halves; a long run needs all of them (the scan stops there).
    assert data.host_indices(40, 100, process_count=2, **kw).size == 40
    for p, share in enumerate(shares):
        ds = data.load_image_dataset(root, only=lambda n: data.host_indices(n, 4, process_index=p, process_count=2,
                                                                             **kw))
        np.testing.assert_array_equal(np.flatnonzero(ds.decoded), share)
        np.testing.assert_array_equal(ds.images[share], arrays[share])
        assert not ds.images[~ds.decoded].any()
        with data.batches(ds, process_index=p, process_count=2, **kw) as it:  # the host's batches are whole
            for step in range(4):
                np.testing.assert_array_equal(next(it)["images"], (arrays[data.batch_indices(
                    40, step, process_index=p, process_count=2, **kw)[0]] / np.float32(127.5) - 1))
            with pytest.raises(RuntimeError, match="which this host did not decode"):
                next(it)  # step 4 reads epoch 0's last 8 positions, 4 of them this host's and not decoded
