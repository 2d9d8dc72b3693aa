"""The torch-free snapshot reader: structure of the reference fixture, storage decoding, and refusal of
anything that would run code."""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES

from edm_jax import torch_pickle as tp

SNAPSHOT = FIXTURES / "snapshot_small.pkl"


@pytest.fixture(scope="module")
def snap():
    if not SNAPSHOT.exists():
        pytest.fail(f"fixture {SNAPSHOT} is missing")
    return tp.load_reference_pickle(SNAPSHOT)


def test_loader_does_not_need_torch():
    # Block torch and the reference's packages outright; loading must still work.
    code = ("import sys\n"
            "for m in ('torch', 'torch_utils', 'dnnlib', 'training'): sys.modules[m] = None\n"
            "from edm_jax import torch_pickle as tp\n"
            f"print(len(tp.state_dict(tp.load_reference_network({str(SNAPSHOT)!r}))))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(tp.__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "149"


def test_snapshot_structure(snap):
    assert list(snap) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = snap["ema"]
    assert isinstance(ema, tp.PersistentObject) and ema.class_name == "EDMPrecond"
    print("ema.init_kwargs", ema.init_kwargs)
    assert ema.init_args == ()
    assert ema.init_kwargs == dict(img_resolution=8, img_channels=3, label_dim=10, model_type="SongUNet",
                                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                   dropout=0.13, augment_dim=9)
    # Preconditioner hyperparameters not passed to the constructor live only in the instance state.
    assert ema.state["sigma_data"] == 0.5 and ema.state["sigma_min"] == 0 and ema.state["sigma_max"] == np.inf
    assert ema.state["use_fp16"] is False and ema.state["training"] is False
    assert ema.module_src.startswith("#")  # inert text, never executed

    model = ema.state["_modules"]["model"]
    assert model.class_name == "SongUNet"
    assert model.init_kwargs == dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=10,
                                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                     dropout=0.13, augment_dim=9)
    enc = model.state["_modules"]["enc"]
    assert isinstance(enc, dict) and list(enc["_modules"]) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    block = enc["_modules"]["4x4_block0"]
    assert block.class_name == "UNetBlock" and block.init_kwargs["eps"] == 1e-6
    assert block.init_kwargs["skip_scale"] == pytest.approx(np.sqrt(0.5))  # a pickled numpy float64 scalar
    assert isinstance(block.state["skip_scale"], np.float64)

    loss = snap["loss_fn"]
    assert loss.class_name == "EDMLoss" and loss.init_kwargs == {}
    assert (loss.state["P_mean"], loss.state["P_std"], loss.state["sigma_data"]) == (-1.2, 1.2, 0.5)

    aug = snap["augment_pipe"]
    print("augment_pipe.init_kwargs", aug.init_kwargs)
    assert aug.class_name == "AugmentPipe"
    assert aug.init_kwargs == dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    assert aug.state["p"] == 0.12 and aug.state["translate_frac_std"] == 0.125 and aug.state["brightness"] == 0

    print("dataset_kwargs", snap["dataset_kwargs"])
    assert snap["dataset_kwargs"] == dict(class_name="training.dataset.ImageFolderDataset", path="datasets/toy.zip",
                                          use_labels=True)


def _expected_songunet_entries(img_resolution, in_channels, out_channels, label_dim, augment_dim,
                               model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                               attn_resolutions=(16,), **_):
    """State-dict (name, shape) of a SongUNet with standard encoder/decoder and positional embedding."""
    emb, noise, out = model_channels * channel_mult_emb, model_channels, []

    def lin(name, i, o, bias=True):
        out.extend([(f"{name}.weight", (o, i))] + ([(f"{name}.bias", (o,))] if bias else []))

    def conv(name, i, o, k, resample=False):
        out.extend([(f"{name}.weight", (o, i, k, k)), (f"{name}.bias", (o,))])
        out.extend([(f"{name}.resample_filter", (1, 1, 2, 2))] if resample else [])

    def block(name, i, o, attention=False, resample=False):
        out.extend([(f"{name}.norm0.weight", (i,)), (f"{name}.norm0.bias", (i,))])
        conv(f"{name}.conv0", i, o, 3, resample)
        lin(f"{name}.affine", emb, o)
        out.extend([(f"{name}.norm1.weight", (o,)), (f"{name}.norm1.bias", (o,))])
        conv(f"{name}.conv1", o, o, 3)
        if o != i or resample:
            conv(f"{name}.skip", i, o, 1, resample)
        if attention:
            out.extend([(f"{name}.norm2.weight", (o,)), (f"{name}.norm2.bias", (o,))])
            conv(f"{name}.qkv", o, 3 * o, 1)
            conv(f"{name}.proj", o, o, 1)

    if label_dim:
        lin("model.map_label", label_dim, noise)
    if augment_dim:
        lin("model.map_augment", augment_dim, noise, bias=False)
    lin("model.map_layer0", noise, emb)
    lin("model.map_layer1", emb, emb)
    skips, cout = [], in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            cout = model_channels
            conv(f"model.enc.{res}x{res}_conv", in_channels, cout, 3)
        else:
            block(f"model.enc.{res}x{res}_down", cout, cout, resample=True)
        skips.append(cout)
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            block(f"model.enc.{res}x{res}_block{i}", cin, cout, attention=res in attn_resolutions)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            block(f"model.dec.{res}x{res}_in0", cout, cout, attention=True)
            block(f"model.dec.{res}x{res}_in1", cout, cout)
        else:
            block(f"model.dec.{res}x{res}_up", cout, cout, resample=True)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            block(f"model.dec.{res}x{res}_block{i}", cin, cout,
                  attention=i == num_blocks and res in attn_resolutions)
        if level == 0:
            out.extend([(f"model.dec.{res}x{res}_aux_norm.weight", (cout,)),
                        (f"model.dec.{res}x{res}_aux_norm.bias", (cout,))])
            conv(f"model.dec.{res}x{res}_aux_conv", cout, out_channels, 3)
    return out


def test_state_dict_names_shapes_and_order(snap):
    sd = tp.state_dict(snap["ema"])
    expected = _expected_songunet_entries(**snap["ema"].state["_modules"]["model"].init_kwargs)
    assert [(k, v.shape) for k, v in sd.items()] == expected  # same names, shapes and order
    assert len(sd) == 149 and sum(v.size for v in sd.values()) == 189683
    assert list(sd)[:3] == ["model.map_label.weight", "model.map_label.bias", "model.map_augment.weight"]
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    assert all(v.ndim == 4 for k, v in sd.items() if "conv" in k.split(".")[-2] and k.endswith("weight"))
    # A buffer with a value known without running a network: filter [1,1] -> outer([1,1]) / 2^2.
    filters = [k for k in sd if k.endswith("resample_filter")]
    assert len(filters) == 4
    for k in filters:
        np.testing.assert_array_equal(sd[k], np.full((1, 1, 2, 2), 0.25, np.float32))
    # The fixture perturbed every tensor, so weights are neither zero nor the GroupNorm init of 1.
    assert all(np.std(v) > 0 for k, v in sd.items() if not k.endswith("resample_filter") and v.size > 1)
    assert abs(float(np.mean(sd["model.enc.8x8_block0.norm0.weight"])) - 1) < 0.2
    # Prefix / sub-module use.
    assert list(tp.state_dict(snap["ema"].state["_modules"]["model"])) == [k[len("model."):] for k in sd]


def test_load_reference_network(tmp_path):
    assert tp.load_reference_network(SNAPSHOT).class_name == "EDMPrecond"
    path = tmp_path / "no_ema.pkl"
    path.write_bytes(pickle.dumps(dict(net=1, dataset_kwargs={})))
    with pytest.raises(tp.SnapshotFormatError, match=r"no 'ema' network entry .*dataset_kwargs"):
        tp.load_reference_network(path)


# --------------------------------------------------------------------------------------------------
# Errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tp.load_reference_pickle(tmp_path / "nope.pkl")


def test_a_folder_is_not_called_missing(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a file; it holds no snapshot file"):
        tp.load_reference_pickle(tmp_path)
    (tmp_path / "network-snapshot-000100.pkl").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"it holds network-snapshot-000100.pkl: pass one of them$"):
        tp.load_torch_save(tmp_path)


@pytest.mark.parametrize("cut", [0.001, 0.5, 0.999])
def test_truncated_snapshot(tmp_path, cut):
    data = SNAPSHOT.read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(tp.SnapshotFormatError, match="is not a reference snapshot pickle"):
        tp.load_reference_pickle(path)


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"PK\x03\x04rest-of-a-zip"])
def test_not_a_pickle(tmp_path, content):
    path = tmp_path / "junk.pkl"
    path.write_bytes(content)
    with pytest.raises(tp.SnapshotFormatError, match="is not a reference snapshot pickle"):
        tp.load_reference_pickle(path)


def test_top_level_not_a_dict(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(tp.SnapshotFormatError, match="expected a dict"):
        tp.load_reference_pickle(path)


# --------------------------------------------------------------------------------------------------
# Malicious pickles

class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def fake_torch(monkeypatch):
    """Stub modules so plain `pickle` can *write* references to the torch / persistence names."""
    mods = {}
    for name in ["torch", "torch._utils", "torch.storage", "torch_utils", "torch_utils.persistence"]:
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])

    def define(module, name, obj):
        obj.__module__, obj.__qualname__ = module, name
        setattr(mods[module], name, obj)
        return obj

    for name in ["_rebuild_tensor_v2", "_rebuild_parameter"]:
        define("torch._utils", name, lambda *a: None)
    define("torch.storage", "_load_from_bytes", lambda *a: None)
    define("torch_utils.persistence", "_reconstruct_persistent_obj", lambda *a: None)
    for name in ["FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "BoolStorage"]:
        define("torch", name, type(name, (), {}))
    return types.SimpleNamespace(**{k.replace(".", "_"): v for k, v in mods.items()})


def _write(tmp_path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen", "nested", "np_object"])
def test_malicious_globals_refused(tmp_path, protocol, attack):
    pwned = tmp_path / "pwned"
    cmd = f"touch {pwned}"
    payload = {
        "os.system": _Reduce(os.system, (cmd,)),
        "builtins.eval": _Reduce(eval, (f"open({str(pwned)!r}, 'w').close()",)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(pwned)],)),
        "nested": dict(ema=dict(_parameters={}, weight=[1, 2, (_Reduce(os.system, (cmd,)),)])),
        "np_object": dict(ema=np.array([1, "x"], dtype=object)),
    }[attack]
    path = _write(tmp_path, payload if attack in ("nested", "np_object") else dict(ema=payload), protocol)
    with pytest.raises(tp.UnsafePickleError, match=rf"refusing to load \S+ from {path}") as info:
        tp.load_reference_pickle(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    # (protocol 2 writes Python-2 module names: __builtin__.eval, commands.Popen)
    expected = {"os.system": ".system ", "builtins.eval": ".eval ", "subprocess.Popen": ".Popen ",
                "nested": ".system ", "np_object": "numpy"}[attack]
    assert expected in str(info.value)
    assert not pwned.exists()


def test_protocol0_attack_not_executed(tmp_path):
    pwned = tmp_path / "pwned"
    path = _write(tmp_path, dict(ema=_Reduce(os.system, (f"touch {pwned}",))), protocol=0)
    with pytest.raises(pickle.UnpicklingError):
        tp.load_reference_pickle(path)
    assert not pwned.exists()


def test_persistent_module_src_is_never_executed(tmp_path, fake_torch):
    pwned = tmp_path / "pwned"
    src = f"open({str(pwned)!r}, 'w').write('owned')\nimport os\nos.system('touch {pwned}')\nclass Evil:\n    pass\n"
    meta = dict(type="class", version=6, module_src=src, class_name="Evil",
                state=dict(x=1, _init_args=(2,), _init_kwargs=dict(y=3)))
    rebuild = fake_torch.torch_utils_persistence._reconstruct_persistent_obj
    path = _write(tmp_path, dict(ema=_Reduce(rebuild, (meta,))))
    obj = tp.load_reference_pickle(path)["ema"]
    assert not pwned.exists()
    assert (obj.class_name, obj.init_args, obj.init_kwargs, obj.state["x"]) == ("Evil", (2,), dict(y=3), 1)
    assert obj.module_src == src

    meta["state"] = dict(evil=_Reduce(os.system, (f"touch {pwned}",)))  # hostile state is still refused
    with pytest.raises(tp.UnsafePickleError, match="system"):
        tp.load_reference_pickle(_write(tmp_path, dict(ema=_Reduce(rebuild, (meta,)))))
    assert not pwned.exists()


# --------------------------------------------------------------------------------------------------
# Synthetic torch storages (torch-free): both serialization formats, dtypes, strided views.

class _StorageRef:
    def __init__(self, pid):
        self.pid = pid


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _StorageRef) else None


def _legacy_blob(storage_cls, raw, numel, evil=None, view=None):
    """Bytes in the layout `torch.save(storage, _use_new_zipfile_serialization=False)` writes."""
    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=True,
                                                           type_sizes=dict(short=2, int=4, long=4))):
        pickle.dump(header, f, protocol=2)
    _PidPickler(f, protocol=2).dump(evil or _StorageRef(("storage", storage_cls, "140", "cpu", numel, view)))
    pickle.dump(["140"], f, protocol=2)
    f.write(struct.pack("<q", numel) + raw)
    return f.getvalue()


def _zip_blob(storage_cls, raw, numel):
    """Bytes in the layout of `torch.save`'s zip format."""
    pkl = io.BytesIO()
    _PidPickler(pkl, protocol=2).dump(_StorageRef(("storage", storage_cls, "0", "cpu", numel)))
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", raw)
        zf.writestr("archive/version", "3\n")
    return f.getvalue()


def _tensor(fake, blob, offset, size, stride, parameter=False):
    storage = _Reduce(fake.torch_storage._load_from_bytes, (blob,))
    t = _Reduce(fake.torch__utils._rebuild_tensor_v2, (storage, offset, size, stride, False,
                                                       collections.OrderedDict()))
    return _Reduce(fake.torch__utils._rebuild_parameter, (t, True, collections.OrderedDict())) if parameter else t


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_synthetic_storages(tmp_path, fake_torch, fmt):
    make = _legacy_blob if fmt == "legacy" else _zip_blob
    t = fake_torch.torch
    base = np.arange(24, dtype=np.float64) * 0.5 - 3
    f32 = base.astype(np.float32)
    bf16_bits = (f32.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
    cases = {
        "double_T": (t.DoubleStorage, base, 2, (3, 4), (1, 3)),  # transposed, offset view
        "half": (t.HalfStorage, base.astype(np.float16), 0, (2, 3, 4), (12, 4, 1)),
        "bf16": (t.BFloat16Storage, bf16_bits, 1, (5,), (4,)),
        "long": (t.LongStorage, np.arange(24, dtype=np.int64) - 7, 3, (), ()),
        "bool": (t.BoolStorage, np.arange(24) % 3 == 0, 0, (4, 2), (1, 8)),
        "float_param": (t.FloatStorage, f32, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
    }
    obj = {name: _tensor(fake_torch, make(cls, arr.tobytes(), arr.size), off, size, stride,
                         parameter=name.endswith("param"))
           for name, (cls, arr, off, size, stride) in cases.items()}
    shared = make(t.FloatStorage, f32.tobytes(), 24)
    obj["shared"] = [_tensor(fake_torch, shared, 0, (24,), (1,)), _tensor(fake_torch, shared, 20, (2, 2), (2, 1))]
    out = tp.load_reference_pickle(_write(tmp_path, obj))

    def ref(arr, off, size, stride):
        return np.lib.stride_tricks.as_strided(arr[off:], size, [s * arr.itemsize for s in stride]).copy()

    for name, (cls, arr, off, size, stride) in cases.items():
        want = ref(arr, off, size, stride)
        if name == "bf16":
            want, arr = ref(f32, off, size, stride), f32
        assert out[name].dtype == arr.dtype and out[name].shape == size, name
        np.testing.assert_array_equal(out[name], want, err_msg=name)
    np.testing.assert_array_equal(out["shared"][1], f32[20:24].reshape(2, 2))


def test_synthetic_bad_storages(tmp_path, fake_torch):
    pwned = tmp_path / "pwned"
    arr = np.zeros(4, np.float32)
    out_of_bounds = _tensor(fake_torch, _legacy_blob(fake_torch.torch.FloatStorage, arr.tobytes(), 4), 2, (3,), (1,))
    with pytest.raises(tp.SnapshotFormatError, match="exceeds its storage"):
        tp.load_reference_pickle(_write(tmp_path, dict(w=out_of_bounds)))
    bomb = _tensor(fake_torch, _legacy_blob(fake_torch.torch.FloatStorage, arr.tobytes(), 4), 0, (10**9,), (0,))
    with pytest.raises(tp.SnapshotFormatError, match="far larger than its storage"):
        tp.load_reference_pickle(_write(tmp_path, dict(w=bomb)))
    evil_blob = _legacy_blob(None, b"", 0, evil=_Reduce(os.system, (f"touch {pwned}",)))
    evil = _tensor(fake_torch, evil_blob, 0, (0,), (1,))
    with pytest.raises(tp.UnsafePickleError, match="refusing to load .*system.*storage blob"):
        tp.load_reference_pickle(_write(tmp_path, dict(w=evil)))
    assert not pwned.exists()


def test_synthetic_legacy_storage_view(tmp_path, fake_torch):
    """Old torch pickled storage slices as (root storage, view_metadata=(view_key, offset, numel))."""
    arr = np.arange(10, dtype=np.float32)
    blob = _legacy_blob(fake_torch.torch.FloatStorage, arr.tobytes(), 10, view=("v1", 3, 4))
    out = tp.load_reference_pickle(_write(tmp_path, dict(w=_tensor(fake_torch, blob, 1, (3,), (1,)))))
    np.testing.assert_array_equal(out["w"], arr[4:7])
