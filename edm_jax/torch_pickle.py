"""Read NVlabs/edm training snapshots (`network-snapshot-*.pkl`, `edm-*.pkl`) without torch.

A snapshot is `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))`; loading
it normally imports torch and *executes the Python source embedded in it* (`torch_utils.persistence`).
Here a restricted unpickler maps each global the file names onto a short allow-list of local, data-only
stand-ins and refuses anything else (`UnsafePickleError`); embedded source stays an inert string.
Result: persistent classes -> `PersistentObject`, torch modules -> dicts of their `__dict__`
(`_parameters`, `_buffers`, `_modules`, ...), tensors -> numpy arrays (bfloat16 widened exactly to
float32), numpy scalars stay numpy scalars.

`load_torch_save` reads plain `torch.save` files the same way (state dicts, Lightning checkpoints):
zip archives and torch's legacy stream, with an allow-list of tensors, storages and OrderedDict.
"""

import dataclasses
import io
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["UnsafePickleError", "SnapshotFormatError", "PersistentObject",
           "load_reference_pickle", "load_reference_network", "state_dict", "load_torch_save", "flax_shape",
           "to_flax_layout"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing from it was imported or run."""


class SnapshotFormatError(pickle.UnpicklingError):
    """The file is not (or not a complete) reference snapshot pickle."""


@dataclasses.dataclass(frozen=True, eq=False)
class PersistentObject:
    """An instance of a `@persistence.persistent_class` class, as inert data.

    `state`: the instance `__dict__` (nn.Modules: `_parameters`, `_buffers`, `_modules`, attributes).
    `init_args`/`init_kwargs`: the constructor arguments the decorator recorded (`state['_init_*']`).
    `module_src`: the embedded source text, for inspection only; never compiled or executed.
    """
    class_name: str
    version: object
    init_args: tuple
    init_kwargs: dict
    state: dict
    module_src: str = dataclasses.field(default="", repr=False)


# --------------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals. Each takes only data and returns only data.

def _reconstruct_persistent_obj(meta):
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`.

    Safe: the original compiles `meta['module_src']` and instantiates a class from it; this one only
    copies the record's fields into a `PersistentObject`, leaving the source as a string.
    """
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        raise SnapshotFormatError("malformed persistent-object record (expected type='class', class_name, state)")
    state = meta["state"]
    args, kwargs = state.get("_init_args", ()), state.get("_init_kwargs", {})
    return PersistentObject(class_name=meta["class_name"], version=meta.get("version"),
                            init_args=tuple(args) if isinstance(args, (tuple, list)) else (),
                            init_kwargs=dict(kwargs) if isinstance(kwargs, dict) else {},
                            state=state, module_src=str(meta.get("module_src") or ""))


class TorchModule(dict):
    """Stand-in for `torch.nn.modules.container.ModuleDict`: a dict of the module's `__dict__`.
    Safe: pickle creates it with `dict.__new__` and fills it via `__setstate__` = checked `dict.update`."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise SnapshotFormatError("malformed torch module state (expected a dict)")
        self.update(state)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a bounds-checked strided copy out of a storage.

    Safe: numpy only; offset/size/stride are validated against the storage before `as_strided`,
    so a hostile view cannot read memory outside the storage (nor expand it hugely via zero strides).
    """
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1):
        raise SnapshotFormatError("tensor record does not refer to a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise SnapshotFormatError(f"bad tensor geometry size={size} stride={stride} offset={offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise SnapshotFormatError(f"tensor view (offset {offset}, size {size}, stride {stride}) "
                                  f"exceeds its storage of {storage.size} elements")
    if int(np.prod(size, dtype=np.float64)) > 16 * storage.size + 4096:  # stride-0 expansion: memory bomb
        raise SnapshotFormatError(f"tensor view of size {size} is far larger than its storage; refusing")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for `torch._utils._rebuild_parameter`: a Parameter is just its (numpy) data."""
    if not isinstance(data, np.ndarray):
        raise SnapshotFormatError("parameter record does not wrap a tensor")
    return data


_SCALAR_KINDS = "biufc"


def _numpy_dtype(spec, align=False, copy=True):
    """Stand-in for `numpy.dtype` (how numpy scalars pickle their dtype). Safe: always a fresh copy
    (the following BUILD only sets its byte order), numeric/bool only, never object/structured."""
    if not isinstance(spec, str):
        raise SnapshotFormatError(f"unsupported numpy dtype spec {spec!r}")
    dt = np.dtype(spec, bool(align), True)
    if dt.kind not in _SCALAR_KINDS or dt.hasobject:
        raise UnsafePickleError(f"refusing numpy dtype {spec!r}: only numeric scalar dtypes are allowed")
    return dt


def _numpy_scalar(dtype, data=None):
    """Stand-in for `numpy.core.multiarray.scalar`: decodes raw bytes into a numeric numpy scalar."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in _SCALAR_KINDS and not dtype.hasobject
            and isinstance(data, bytes) and len(data) == dtype.itemsize):
        raise SnapshotFormatError("malformed numpy scalar record")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


# --------------------------------------------------------------------------------------------------
# Serialized torch storages (`torch.storage._load_from_bytes` argument).

_STORAGE_DTYPES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
                   "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
                   "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8",
                   "ComplexDoubleStorage": "c16", "UntypedStorage": "u1"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType(str):
    """Stand-in for the `torch.<T>Storage` classes: just the element type's name."""


class _StorageUnpickler(pickle.Unpickler):
    """Reads the small pickles inside a torch-saved storage; allows only `torch.<T>Storage` names."""

    def __init__(self, file, source, persistent_load=None):
        super().__init__(file)
        self._source, self._pload = source, persistent_load

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to load {module}.{name} from {self._source} (inside a storage "
                                "blob): only torch.<Type>Storage names are allowed there")

    def persistent_load(self, pid):
        if self._pload is None:
            raise SnapshotFormatError(f"unexpected persistent id in {self._source}")
        return self._pload(pid)


def _decode(raw, type_name, numel, little_endian, source):
    """Raw storage bytes -> 1-D native-order numpy array (bfloat16 widened exactly to float32)."""
    code = _STORAGE_DTYPES.get(str(type_name))
    if code is None:
        raise SnapshotFormatError(f"{source}: unsupported storage type {type_name!r}")
    dt = np.dtype("u2" if code == "bf16" else code).newbyteorder("<" if little_endian else ">")
    if numel < 0 or len(raw) < numel * dt.itemsize:
        raise SnapshotFormatError(f"{source}: storage data is truncated")
    arr = np.frombuffer(raw, dtype=dt, count=numel).astype(dt.newbyteorder("="))
    return (arr.astype(np.uint32) << 16).view(np.float32) if code == "bf16" else arr


def _load_legacy_storage(blob, source):
    """`torch.save(storage, _use_new_zipfile_serialization=False)`: the format torch pickles storages in.

    Pickles of: magic, 1001, sys_info, the storage (a persistent id), the list of storage keys; then
    per key an int64 element count and the raw bytes, both little-endian whatever the writer was.
    """
    f = io.BytesIO(blob)
    if _StorageUnpickler(f, source).load() != _LEGACY_MAGIC:
        raise SnapshotFormatError(f"{source}: storage blob is neither a torch zip archive nor torch's legacy "
                                  "format (very old tar-based torch files are not supported)")
    if _StorageUnpickler(f, source).load() != 1001:
        raise SnapshotFormatError(f"{source}: unsupported legacy torch serialization protocol")
    _StorageUnpickler(f, source).load()  # sys_info: informational only
    records = {}

    def pload(pid):  # ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise SnapshotFormatError(f"{source}: unexpected persistent id {pid!r}")
        records.setdefault(str(pid[2]), (pid[1], int(pid[4])))
        return str(pid[2]), pid[5]

    key, view = _StorageUnpickler(f, source, pload).load()
    arrays = {}
    for k in _StorageUnpickler(f, source).load():
        stype, numel = records[str(k)]
        if struct.unpack("<q", f.read(8))[0] != numel:
            raise SnapshotFormatError(f"{source}: storage size mismatch")
        itemsize = 2 if _STORAGE_DTYPES.get(str(stype)) == "bf16" else np.dtype(_STORAGE_DTYPES[str(stype)]).itemsize
        arrays[str(k)] = _decode(f.read(numel * itemsize), stype, numel, True, source)
    if view is None:
        return arrays[key]
    _, off, n = view  # (view_key, offset, size) in elements: a storage slice, from old torch versions
    return arrays[key][int(off):int(off) + int(n)]


def _load_zip_storage(blob, source):
    """`torch.save` zip format: `<name>/data.pkl` + raw little-endian bytes in `<name>/data/<key>`."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        pkl = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkl:
            raise SnapshotFormatError(f"{source}: torch zip archive without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(zf.namelist())
        little = zf.read(prefix + "byteorder").strip() != b"big" if prefix + "byteorder" in names else True

        def pload(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise SnapshotFormatError(f"{source}: unexpected persistent id {pid!r}")
            _, stype, key, _location, numel = pid
            if f"{prefix}data/{key}" not in names:
                raise SnapshotFormatError(f"{source}: storage {key!r} missing from the archive")
            return _decode(zf.read(f"{prefix}data/{key}"), stype, int(numel), little, source)

        return _StorageUnpickler(io.BytesIO(zf.read(pkl[0])), source, pload).load()


def _load_from_bytes(blob, source):
    """Stand-in for `torch.storage._load_from_bytes`: a torch-saved storage -> 1-D numpy array.
    Safe: the inner pickles go through `_StorageUnpickler`, which allows only storage type names."""
    if not isinstance(blob, (bytes, bytearray)):
        raise SnapshotFormatError(f"{source}: storage record is not bytes")
    blob = bytes(blob)
    arr = _load_zip_storage(blob, source) if blob[:4] == b"PK\x03\x04" else _load_legacy_storage(blob, source)
    if not isinstance(arr, np.ndarray):
        raise SnapshotFormatError(f"{source}: storage blob does not hold a storage")
    return arr


# ---------------------------------------------------------------------------------------------------
# Reading a torch.save file without torch. Both of torch's formats: the zip archive (torch >= 1.6:
# `<dir>/data.pkl` + raw storages `<dir>/data/<key>`) and the legacy stream (magic, protocol, sys_info,
# the pickle, the storage keys, then each storage as int64 count + raw bytes). The pickle may name only
# OrderedDict, torch's tensor/parameter rebuild functions, storage types and numpy scalars (the safe
# stand-ins above); anything else is refused unexecuted. The inception weights and PSLD's Lightning
# checkpoints are such files.

class _StateDict(dict):
    """Stand-in for `collections.OrderedDict` (a dict keeps the order). Pickle BUILDs a state dict's
    `_metadata` attribute onto it; that version bookkeeping is dropped."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise SnapshotFormatError("malformed OrderedDict state")


class _TorchSaveUnpickler(pickle.Unpickler):
    _ALLOWED = {("collections", "OrderedDict"): _StateDict,
                ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("numpy", "dtype"): _numpy_dtype,
                ("numpy._core.multiarray", "scalar"): _numpy_scalar,
                ("numpy.core.multiarray", "scalar"): _numpy_scalar}

    def __init__(self, file, source, load_storage):
        super().__init__(file)
        self._source, self._load_storage = source, load_storage

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing to load {module}.{name} from {self._source}: only tensors, "
                                    "storages, OrderedDict and numpy scalars are allowed in a torch.save file")
        return target

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and (len(pid) == 5 or pid[5] is None)):  # (legacy storage views: pre-2018 torch only)
            raise SnapshotFormatError(f"{self._source}: unexpected persistent id {pid!r}")
        return self._load_storage(str(pid[1]), str(pid[2]), int(pid[4]))


def _read_zip(f, source):
    with zipfile.ZipFile(f) as zf:
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n == "data.pkl" or n.endswith("/data.pkl"))
        if not pkl:
            raise SnapshotFormatError(f"{source} is a zip archive without data.pkl, not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        little = zf.read(prefix + "byteorder").strip() != b"big" if prefix + "byteorder" in names else True

        def load_storage(stype, key, numel):
            if f"{prefix}data/{key}" not in names:
                raise SnapshotFormatError(f"{source}: storage {key!r} missing from the archive")
            return _decode(zf.read(f"{prefix}data/{key}"), stype, numel, little, source)

        return _TorchSaveUnpickler(io.BytesIO(zf.read(pkl[0])), source, load_storage).load()


def _read_legacy_state_dict(f, source):
    """Legacy format: tensors reference storages stored *after* the pickle, so unpickle twice: first to
    learn the storage table, then (after reading the raw storages) with the real arrays."""
    header = _TorchSaveUnpickler(f, source, None)
    if header.load() != _LEGACY_MAGIC:
        raise SnapshotFormatError(f"{source} is neither a torch zip archive nor a legacy torch.save file")
    if header.load() != 1001:
        raise SnapshotFormatError(f"{source}: unsupported legacy torch serialization protocol")
    header.load()  # sys_info: informational; torch writes legacy storages little-endian on every machine
    pickle_start = f.tell()
    records = {}

    def record(stype, key, numel):  # first pass: remember, hand out an empty storage of the right size
        records.setdefault(key, (stype, numel))
        code = _STORAGE_DTYPES.get(stype)
        if code is None:
            raise SnapshotFormatError(f"{source}: unsupported storage type {stype!r}")
        return np.zeros(numel, np.float32 if code == "bf16" else np.dtype(code))

    _TorchSaveUnpickler(f, source, record).load()
    keys = _TorchSaveUnpickler(f, source, None).load()
    arrays = {}
    for key in keys:
        stype, numel = records[str(key)]
        (count,) = struct.unpack("<q", f.read(8))
        if count != numel:
            raise SnapshotFormatError(f"{source}: storage {key} holds {count} elements, the pickle says {numel}")
        code = _STORAGE_DTYPES[stype]
        itemsize = 2 if code == "bf16" else np.dtype(code).itemsize
        arrays[str(key)] = _decode(f.read(numel * itemsize), stype, numel, True, source)
    f.seek(pickle_start)
    return _TorchSaveUnpickler(f, source, lambda stype, key, numel: arrays[key]).load()



def _require_file(path: str, what: str):
    """FileNotFoundError for a missing path; for a folder, IsADirectoryError naming the snapshots inside it
    (a folder given where one file belongs is a common slip, and 'does not exist' would be false)."""
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".pkl", ".ckpt", ".pt", ".pth")))
        hint = (f"; it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}: pass one of them" if found
                else "; it holds no snapshot file (.pkl, .ckpt, .pt) either")
        raise IsADirectoryError(f"{what} {path} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")


def load_torch_save(path):
    """A `torch.save` file (zip archive or legacy stream) -> its object as plain data, without torch.

    Tensors become numpy arrays, OrderedDicts dicts; any other global in the pickle raises
    `UnsafePickleError` before anything from the file runs; unreadable files raise `SnapshotFormatError`.
    """
    path = os.fspath(path)
    _require_file(path, "torch.save file")
    source = os.path.basename(path)
    with open(path, "rb") as f:
        try:
            if f.read(4) == b"PK\x03\x04":
                f.seek(0)
                return _read_zip(f, source)
            f.seek(0)
            return _read_legacy_state_dict(f, source)
        except (UnsafePickleError, SnapshotFormatError):
            raise
        except _CORRUPT as e:
            raise SnapshotFormatError(f"{path} is not a readable torch.save file "
                                      f"(truncated or corrupt: {type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------

# What a truncated or corrupt pickle or archive raises while being read (reported as SnapshotFormatError).
_CORRUPT = (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile)

_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): dict,  # an OrderedDict's data is its items; dict keeps their order
    ("torch.nn.modules.container", "ModuleDict"): TorchModule,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,  # bound to the file name in find_class
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
}


class _SnapshotUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing to load {module}.{name} from {self._source}: not one of the "
                                    "torch/numpy/persistence globals an EDM snapshot needs")
        if target is _load_from_bytes:
            return lambda blob: _load_from_bytes(blob, self._source)
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r} in {self._source}: snapshots use none")


def load_reference_pickle(path) -> dict:
    """Load a reference snapshot pickle as plain data (see module docstring); never imports torch."""
    path = os.fspath(path)
    _require_file(path, "reference snapshot")
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:1] != b"\x80":
            hint = " (it is a zip archive, e.g. a torch.save .pt file)" if head == b"PK\x03\x04" else ""
            raise SnapshotFormatError(f"{path} is not a reference snapshot pickle: no pickle protocol 2+ "
                                      f"header{hint}")
        f.seek(0)
        try:
            obj = _SnapshotUnpickler(f, path).load()
        except (UnsafePickleError, SnapshotFormatError):
            raise
        except _CORRUPT as e:
            raise SnapshotFormatError(f"{path} is not a reference snapshot pickle (truncated or corrupt: "
                                      f"{type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise SnapshotFormatError(f"{path} is not a reference snapshot pickle (top level is "
                                  f"{type(obj).__name__}, expected a dict)")
    return obj


def load_reference_network(path, key="ema") -> PersistentObject:
    """`load_reference_pickle(path)[key]`, with a clear error when the entry is missing."""
    snap = load_reference_pickle(path)
    net = snap.get(key)
    if not isinstance(net, PersistentObject):
        raise SnapshotFormatError(f"{os.fspath(path)} has no {key!r} network entry "
                                  f"(top-level keys: {sorted(map(str, snap))})")
    return net


def _module_fields(module):
    d = module.state if isinstance(module, PersistentObject) else module
    if not (isinstance(d, dict) and all(isinstance(d.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))):
        raise TypeError(f"not a torch module record: {type(module).__name__}")
    return d


def state_dict(module, prefix="") -> dict:
    """Flatten a loaded module record like torch's `Module.state_dict()`.

    Per module: parameters, then persistent buffers (both skipping None), then each child module with
    `name.` prefix; i.e. the reference's names (`model.enc.32x32_conv.weight`, ...) in its order.
    """
    out = {}

    def visit(m, pre):
        d = _module_fields(m)
        skip = d.get("_non_persistent_buffers_set") or set()
        out.update((pre + k, v) for k, v in d["_parameters"].items() if v is not None)
        out.update((pre + k, v) for k, v in d["_buffers"].items() if v is not None and k not in skip)
        for k, sub in d["_modules"].items():
            if sub is not None:
                visit(sub, f"{pre}{k}.")

    visit(module, prefix)
    return out


def flax_shape(shape):
    """The flax shape of a torch tensor of `shape`: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        return shape[2], shape[3], shape[1], shape[0]
    if len(shape) == 2:
        return shape[1], shape[0]
    return shape


def to_flax_layout(array):
    """One torch array in the flax layout (`flax_shape`), float32 numpy: the one OIHW -> HWIO transpose."""
    array = np.asarray(array, np.float32)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array
