"""FID: the Inception-v3 port against pytorch-fid (fixture with deterministic weights), the weight-file
loader (no torch, no download), feature statistics, and the Fréchet distance against closed forms.

CPU cost: the network is compiled three times ([2, 32, 32, 3] float, [2, 299, 299, 3] float and
[2, 32, 32, 3] uint8), once each, via module-scoped fixtures.
"""

import collections
import io
import os
import pickle
import socket
import struct
import urllib.request
import zipfile

import jax
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture, nchw_to_nhwc, rel_err

from edm_jax import fid, inception, torch_pickle

N_ENTRIES = 566  # state-dict entries of pt_inception-2015-12-05-6726825d.pth
N_COUNTERS = 94  # of which bn.num_batches_tracked (one per BasicConv2d)


@pytest.fixture(scope="module")
def ref():
    out = load_fixture("inception_fid.npz")
    with np.load(FIXTURES / "inception_fid.npz") as z:  # load_fixture turns string arrays into one str
        out["names"] = [str(n) for n in z["names"]]
        out["shapes"] = [tuple(int(d) for d in str(s).split(",") if d) for s in z["shapes"]]
    return out


@pytest.fixture(scope="module")
def state_dict(ref):
    return inception.deterministic_weights(ref["names"], ref["shapes"])


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception.variables_from_state_dict(state_dict)


@jax.jit
def _summary(variables, x):
    """Everything the fixture records, for one batch of NHWC images in [0, 1]."""
    out = inception.InceptionV3FID().apply(variables, x)
    return dict(pool=out["pool"], logits=out["logits"],
                **{f"block{i}": out[f"block{i}"].mean(axis=(1, 2)) for i in range(3)})


@pytest.fixture(scope="module")
def outputs(ref, variables):
    x32, x299 = nchw_to_nhwc(ref["x32"]), nchw_to_nhwc(ref["x299"])
    halves = [_summary(variables, x32[:2]), _summary(variables, x32[2:])]  # one compiled shape, batch 2
    out = {f"{k}_x32": np.concatenate([np.asarray(h[k]) for h in halves]) for k in halves[0]}
    out["pool_x299"] = np.asarray(_summary(variables, x299)["pool"])
    return out


# ---------------------------------------------------------------------------------------------------
# Parity with pytorch-fid (fixture computed by torch with the same deterministic weights).

@pytest.mark.parametrize("ours,theirs", [("pool_x32", "pool_x32"), ("pool_x299", "pool_x299"),
                                         ("logits_x32", "fc_logits_x32"), ("block0_x32", "block0_mean_x32"),
                                         ("block1_x32", "block1_mean_x32"), ("block2_x32", "block2_mean_x32")])
def test_parity_with_pytorch_fid(outputs, ref, ours, theirs):
    a, b = outputs[ours], ref[theirs]
    assert a.shape == b.shape
    raw = rel_err(a, b)
    # Random weights make deep features nearly image-independent: the image-dependent part is what counts.
    centred = rel_err(a - a.mean(axis=0), b - b.mean(axis=0))
    print(f"{ours}: raw rel err {raw:.2e}, centred rel err {centred:.2e}")
    assert raw < 1e-3 and centred < 1e-3


def test_resize_matches_torch_bilinear_formula():
    # F.interpolate(bilinear, align_corners=False) 4 -> 6 along one axis, as torch prints it (and by hand:
    # src = (dst + 0.5)·4/6 − 0.5 clamped at 0 = [0, 0.5, 1.1667, 1.8333, 2.5, 3.1667 -> last pixel]).
    m = inception._bilinear_matrix(4, 6)
    expect = np.array([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 5 / 6, 1 / 6, 0], [0, 1 / 6, 5 / 6, 0],
                       [0, 0, 0.5, 0.5], [0, 0, 0, 1]])
    np.testing.assert_allclose(m, expect, atol=1e-6)
    np.testing.assert_array_equal(inception._bilinear_matrix(7, 7), np.eye(7, dtype=np.float32))
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    y = np.asarray(inception.resize_bilinear(x, 6, 6))
    np.testing.assert_allclose(y, np.einsum("oh,pw,nhwc->nopc", expect, expect, x), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Names, layouts and the weight recipe.

def test_state_dict_names_and_order_match_the_file(ref):
    table = inception.state_dict_shapes()
    assert len(table) == N_ENTRIES
    assert list(table) == ref["names"]
    assert list(table.values()) == ref["shapes"]


def test_name_map_covers_every_entry_both_ways(ref, variables):
    shapes = dict(zip(ref["names"], ref["shapes"]))
    plan = inception.match_state_dict(shapes)
    assert len(plan) == N_ENTRIES - N_COUNTERS
    assert sum(n.endswith("num_batches_tracked") for n in shapes) == N_COUNTERS
    leaves = jax.tree_util.tree_leaves(variables)
    assert len(leaves) == len(plan) == len(set(plan.values()))  # every flax leaf filled exactly once
    assert set(variables) == {"params", "batch_stats"}
    assert plan["Mixed_7c.branch_pool.bn.running_var"] == ("batch_stats", "Mixed_7c", "branch_pool", "bn", "var")
    assert plan["fc.weight"] == ("params", "fc", "kernel")

    with pytest.raises(ValueError, match=r"1 flax variables missing.*Mixed_6b/branch7x7_2/conv/kernel"):
        inception.match_state_dict({k: v for k, v in shapes.items() if k != "Mixed_6b.branch7x7_2.conv.weight"})
    with pytest.raises(ValueError, match=r"2 entries with no flax variable: AuxLogits.fc.weight, AuxLogits.fc.bias"):
        inception.match_state_dict({**shapes, "AuxLogits.fc.weight": (1008, 768), "AuxLogits.fc.bias": (1008,)})
    with pytest.raises(ValueError, match=r"1 entries with no flax variable: AuxLogits.conv0.bn.num_batches_tracked"):
        inception.match_state_dict({**shapes, "AuxLogits.conv0.bn.num_batches_tracked": ()})
    with pytest.raises(ValueError, match=r"1 shape mismatches: fc.weight: torch \[1000, 2048\]"):
        inception.match_state_dict({**shapes, "fc.weight": (1000, 2048)})


def test_layouts_and_values_land_where_they_belong(state_dict, variables):
    k = np.asarray(variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])  # torch (1,7) conv
    w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]
    assert w.shape == (128, 128, 1, 7) and k.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["kernel"]), state_dict["fc.weight"].T)
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"]),
                                  state_dict["Conv2d_1a_3x3.bn.running_var"])


def test_deterministic_weights_recipe(ref, state_dict):
    assert list(state_dict) == ref["names"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((32, 3, 3, 3))
    np.testing.assert_array_equal(state_dict["Conv2d_1a_3x3.conv.weight"], (z * np.sqrt(2 / 27)).astype(np.float32))
    np.testing.assert_array_equal(state_dict["Conv2d_1a_3x3.bn.weight"],
                                  (1 + 0.1 * rng.standard_normal(32)).astype(np.float32))
    assert state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"].shape == ()
    assert all(v.dtype == np.float32 for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert all(v.min() >= 1 for k, v in state_dict.items() if k.endswith("running_var"))
    assert not state_dict["fc.bias"].any()
    default = inception.deterministic_weights()  # names/shapes from the architecture table: the same
    assert all(np.array_equal(default[k], state_dict[k]) for k in state_dict)


# ---------------------------------------------------------------------------------------------------
# Features of uint8 images.

def test_compute_features_batches_pads_and_handles_grayscale(variables):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = fid.compute_features(images, variables, batch_size=2)  # 2 batches, the last one padded
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    x = images.astype(np.float32) / 255
    direct = np.concatenate([np.asarray(_summary(variables, x[:2])["pool"]),
                             np.asarray(_summary(variables, np.concatenate([x[2:], 0 * x[:1]]))["pool"])[:1]])
    assert rel_err(feats, direct) < 1e-5
    assert rel_err(feats - feats.mean(0), direct - direct.mean(0)) < 1e-4

    gray = images[:2, ..., 0]
    want = fid.compute_features(np.repeat(gray[..., None], 3, axis=-1), variables, batch_size=2)
    np.testing.assert_array_equal(fid.compute_features(gray, variables, batch_size=2), want)
    np.testing.assert_array_equal(fid.compute_features(gray[..., None], variables, batch_size=2), want)

    with pytest.raises(ValueError, match="uint8"):
        fid.compute_features(x, variables, batch_size=2)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        fid.compute_features(images[..., :2], variables, batch_size=2)


def test_compute_features_sharded_over_a_mesh(variables):
    images = np.random.default_rng(8).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    np.testing.assert_allclose(fid.compute_features(images, variables, batch_size=2, mesh=mesh),
                               fid.compute_features(images, variables, batch_size=2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size 3 must be a multiple of the mesh's 'data' axis"):
        next(fid.iter_features(images, variables, batch_size=3, mesh=mesh))


def test_fid_of_images_feeds_the_distance_its_statistics(variables, monkeypatch, tmp_path):
    # The 2048x2048 sqrtm takes about a minute on 2 CPU cores; here only the plumbing is checked.
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # one batch
    mu, sigma = fid.feature_statistics(fid.compute_features(images, variables, batch_size=2))
    mu_ref, sigma_ref = mu + 1, 2 * sigma
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: calls.append(a) or 7.0)
    path = fid.save_reference_stats(tmp_path / "ref.npz", mu_ref, sigma_ref)
    for ref_stats in [(mu_ref, sigma_ref), {"mu": mu_ref, "sigma": sigma_ref}, path]:
        assert fid.fid_of_images(images, ref_stats, variables, batch_size=2) == 7.0
    for got in calls:
        np.testing.assert_allclose(got[0], mu, rtol=1e-12)
        np.testing.assert_allclose(got[1], sigma, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got[2], mu_ref)
        np.testing.assert_array_equal(got[3], sigma_ref)


# ---------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance.

def test_statistics_are_mean_and_unbiased_covariance_and_converge():
    rng = np.random.default_rng(3)
    d, n = 16, 20000
    mu = rng.standard_normal(d)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    sigma = a @ a.T + 0.1 * np.eye(d)
    f = rng.multivariate_normal(mu, sigma, size=n)
    m, s = fid.feature_statistics(f)
    assert m.dtype == s.dtype == np.float64 and s.shape == (d, d)
    np.testing.assert_allclose(m, f.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)  # unbiased (n - 1)
    assert np.linalg.norm(m - mu) < 5 * np.sqrt(np.trace(sigma) / n)
    assert rel_err(s, sigma) < 0.05

    stream = fid.FeatureStats(d)  # uneven chunks and a merged second accumulator: the same statistics
    stream.update(f[:7]).update(f[7:5000])
    stream.merge(fid.FeatureStats(d).update(f[5000:]))
    m2, s2 = stream.mean_and_cov()
    assert stream.n == n
    np.testing.assert_allclose(m2, m, rtol=1e-12)
    np.testing.assert_allclose(s2, s, rtol=1e-9, atol=1e-12)

    with pytest.raises(ValueError, match="at least 2 images"):
        fid.feature_statistics(f[:1])
    with pytest.raises(ValueError, match=r"\[batch, 16\]"):
        fid.FeatureStats(d).update(f[:, :3])


def test_frechet_distance_commuting_closed_form():
    rng = np.random.default_rng(4)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    assert abs(got - expect) < 1e-10 * expect
    assert abs(fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a))) < 1e-10


def test_frechet_distance_non_commuting_against_eigendecomposition():
    rng = np.random.default_rng(5)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a1, a2 = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
    s1, s2 = a1 @ a1.T / (2 * d), a2 @ a2.T / (2 * d) + 0.01 * np.eye(d)
    assert np.linalg.norm(s1 @ s2 - s2 @ s1) > 0.1 * np.linalg.norm(s1 @ s2)
    # tr sqrtm(S1 S2) = tr sqrtm(S1^½ S2 S1^½): S1 S2 is similar to that symmetric PSD matrix.
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(s1_half @ s2 @ s1_half)
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expect) < 1e-8 * expect
    assert abs(fid.frechet_distance(mu2, s2, mu1, s1) - got) < 1e-8 * expect
    with pytest.raises(ValueError, match="one D"):
        fid.frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_reference_stats_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)), rowvar=False)
    path = fid.save_reference_stats(tmp_path / "sub" / "refs.npz", mu, sigma)
    with np.load(path) as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64
    m, s = fid.load_reference_stats(path)
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)

    with pytest.raises(FileNotFoundError, match="not found"):
        fid.load_reference_stats(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="is a URL; edm_jax never downloads"):
        fid.load_reference_stats("https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"lacks the keys mu and sigma \(it has \['mean'\]\)"):
        fid.load_reference_stats(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a readable npz"):
        fid.load_reference_stats(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------------
# The weights file: never downloaded, checked, decoded without torch.

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_weights_file_one_sentence_and_no_download(tmp_path, monkeypatch, no_network):
    path = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError) as e:
        inception.load_inception_weights(path)
    assert str(e.value) == (
        f"Inception weights {path} not found: download "
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
        " (95,628,359 bytes) on a machine with internet access and copy it to that path (or pass its location "
        "as `path` or in $EDM_JAX_INCEPTION_WEIGHTS); edm_jax never downloads anything, so it cannot be "
        "fetched from here.")
    monkeypatch.setenv("EDM_JAX_INCEPTION_WEIGHTS", str(path))
    with pytest.raises(FileNotFoundError, match=f"Inception weights {path} not found"):
        fid.load_inception_weights()  # the default path comes from the environment variable
    assert not path.parent.exists()  # nothing created either


def test_wrong_size_and_wrong_hash_are_refused(tmp_path, no_network):
    short = tmp_path / "short.pth"
    short.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match=r"has 1,000 bytes, not the 95,628,359 of pt_inception-2015-12-05-"
                                         r"6726825d.pth: it is truncated or a different file"):
        inception.load_inception_weights(short)
    same_size = tmp_path / "zeros.pth"
    with open(same_size, "wb") as f:
        f.truncate(inception.WEIGHTS_BYTES)  # sparse: the right size, the wrong content
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{8}\.\.\., not 6726825d\.\.\. as its name"):
        inception.load_inception_weights(same_size)


# A torch.save writer that needs no torch: pickles naming torch's globals, storages as persistent ids.

class _Global:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("only pickled, never called")


class _Storage:
    def __init__(self, key, flat):
        self.key, self.flat = key, flat


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), (*self.args, False, collections.OrderedDict())


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _TorchPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy, self.storages = legacy, {}

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        self.storages[obj.key] = obj.flat
        pid = ("storage", _Global("torch", _STORAGE_NAMES[obj.flat.dtype]), obj.key, "cpu", obj.flat.size)
        return pid + (None,) if self.legacy else pid


def _torch_save(path, tensors, legacy):
    """tensors: {name: (flat storage array, offset, size, stride)}, written in torch's zip or legacy format."""
    sd = collections.OrderedDict()
    storages = {}
    for name, (flat, offset, size, stride) in tensors.items():
        key = storages.setdefault(id(flat), _Storage(str(len(storages)), flat))
        sd[name] = _Tensor(key, offset, size, stride)
    with open(path, "wb") as f:
        if legacy:
            for header in (torch_pickle._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            p = _TorchPickler(f, legacy=True)
            p.dump(sd)
            keys = sorted(p.storages)
            pickle.dump(keys, f, protocol=2)
            for k in keys:
                flat = p.storages[k]
                f.write(struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes())
        else:
            buf = io.BytesIO()
            p = _TorchPickler(buf, legacy=False)
            p.dump(sd)
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr("archive/data.pkl", buf.getvalue())
                zf.writestr("archive/byteorder", "little")
                for k, flat in p.storages.items():
                    zf.writestr(f"archive/data/{k}", flat.tobytes())


def _contiguous(a):
    a = np.ascontiguousarray(a)
    return a.reshape(-1), 0, a.shape, tuple(s // a.itemsize for s in a.strides)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_reader_formats_views_and_refusals(tmp_path, legacy):
    rng = np.random.default_rng(7)
    shared = rng.standard_normal(24).astype(np.float32)  # one storage, two views: offset and transposed strides
    tensors = {"a.weight": (shared, 4, (2, 3), (1, 2)), "a.bias": (shared, 0, (4,), (1,)),
               "a.num_batches_tracked": _contiguous(np.array(5, np.int64))}
    path = tmp_path / "small.pth"
    _torch_save(path, tensors, legacy)
    sd = inception.read_torch_state_dict(path)
    assert list(sd) == list(tensors)
    np.testing.assert_array_equal(sd["a.weight"], shared[4:10].reshape(3, 2).T)
    np.testing.assert_array_equal(sd["a.bias"], shared[:4])
    assert sd["a.num_batches_tracked"] == 5 and sd["a.num_batches_tracked"].dtype == np.int64

    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.")
    with pytest.raises(torch_pickle.UnsafePickleError, match="refusing to load os.system"):
        inception.read_torch_state_dict(evil)


def test_load_inception_weights_end_to_end_without_torch(tmp_path, state_dict, variables, monkeypatch, no_network):
    path = tmp_path / inception.WEIGHTS_FILENAME
    _torch_save(path, {k: _contiguous(v) for k, v in state_dict.items()}, legacy=True)
    # The stand-in is not byte-identical to the real file: accept its size, skip the real file's hash.
    monkeypatch.setattr(inception, "WEIGHTS_BYTES", os.path.getsize(path))
    loaded = fid.load_inception_weights(path, check_hash=False)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(loaded),
                                                     jax.tree_util.tree_leaves(variables)))
