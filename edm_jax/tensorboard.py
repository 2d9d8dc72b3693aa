"""A tiny TensorBoard scalar writer (and reader) with no TensorFlow or tensorboard dependency.

TensorBoard reads `events.out.tfevents.*` files: a TFRecord stream of serialized `Event` protobufs. Each
record is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

with masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32) and crc32c the Castagnoli CRC. The
first record of a file carries `file_version = "brain.Event:2"`; the others carry a `Summary` of scalars.
The protobufs are hand-encoded here, only the fields needed (tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto):

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
                 SessionLog session_log = 6; }
    Summary    { repeated Value value = 1; }
    Value      { string tag = 1; float simple_value = 2; }
    SessionLog { enum SessionStatus { STATUS_UNSPECIFIED = 0; START = 1; ... } status = 1; }

A resumed run discards what the dead run logged past its last checkpoint with a SessionLog START event at
the first step it will log again (`purge_step`, as tensorboardX's writer does): TensorBoard's event
accumulator then drops every earlier-read point at that step or later (event_accumulator.py,
`_CheckForRestartAndMaybePurge`), so a resumed run shows no duplicate points. `read_scalars` applies the
same rule.

`read_scalars` reads such files back (checking both CRCs of every record), for tests and for looking at a run
without TensorBoard installed.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time
from typing import Iterator, List, Mapping, Optional, Tuple

__all__ = ["crc32c", "masked_crc32c", "SummaryWriter", "read_records", "read_scalars"]

_FILE_VERSION = "brain.Event:2"
_SESSION_START = 1  # SessionLog.START


# ---------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, table-based.

def _make_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of `data` (continuing from `crc`); crc32c(b"123456789") == 0xE3069283."""
    table = _CRC_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# Protobuf wire format, the few pieces needed.

def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                  scalars: Optional[Mapping[str, float]] = None, session_start: bool = False) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _len_delimited(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(
            _len_delimited(1, _len_delimited(1, str(tag).encode()) + _key(2, 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _len_delimited(5, summary)
    if session_start:
        out += _len_delimited(6, _key(1, 0) + _varint(_SESSION_START))
    return out


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of each field of a serialized message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wire_type, value


# ---------------------------------------------------------------------------------------------------
# Writer.

class SummaryWriter:
    """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<hostname>`.

    Each `scalar`/`scalars` call writes one record and flushes, so a killed run loses nothing that was logged.
    A new writer on the same logdir (a resumed run) starts a new file beside the old ones; TensorBoard merges
    all the files of a folder. `purge_step`: the first step this writer will log; points of earlier files at
    that step or later are discarded by readers (a SessionLog START event, see the module docstring).
    """

    def __init__(self, logdir: str, filename_suffix: str = "", purge_step: Optional[int] = None):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                                         f"{filename_suffix}")
        self._file = open(self.path, "ab")
        self._write(_encode_event(time.time(), 0, file_version=_FILE_VERSION))
        if purge_step is not None:
            self._write(_encode_event(time.time(), int(purge_step), session_start=True))
        self.flush()

    def _write(self, payload: bytes):
        if self._file is None:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        header = struct.pack("<Q", len(payload))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + payload
                         + struct.pack("<I", masked_crc32c(payload)))

    def scalar(self, tag: str, value: float, step: int, wall_time: Optional[float] = None):
        self.scalars({tag: value}, step, wall_time)

    def scalars(self, values: Mapping[str, float], step: int, wall_time: Optional[float] = None):
        """Write `values` (tag -> number, stored as float32) at `step`, as one event, and flush."""
        self._write(_encode_event(time.time() if wall_time is None else float(wall_time), int(step),
                                  scalars={str(k): float(v) for k, v in values.items()}))
        self.flush()

    def flush(self):
        if self._file is not None:
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------
# Reader.

def read_records(path: str) -> Iterator[bytes]:
    """The payloads of a TFRecord file, checking both CRCs of each record (ValueError on a mismatch)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if crc != masked_crc32c(header):
            raise ValueError(f"{path}: corrupt record at byte {pos}: length CRC mismatch")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos} (needs {length} payload bytes)")
        payload = data[start:end]
        (crc,) = struct.unpack("<I", data[end:end + 4])
        if crc != masked_crc32c(payload):
            raise ValueError(f"{path}: corrupt record at byte {pos}: payload CRC mismatch")
        yield payload
        pos = end + 4


def _event_files(path: str) -> List[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*tfevents*")))
    return [path]


def read_scalars(path: str) -> List[Tuple[int, str, float]]:
    """[(step, tag, value)] of the scalar summaries in an events file (or in all of a folder's, by name), as
    TensorBoard shows them: a SessionLog START event at step s drops the points read so far at steps ≥ s.

    Raises ValueError when a record's CRC does not match or a file is cut short.
    """
    out = []
    for file in _event_files(path):
        for payload in read_records(file):
            step, values, start = 0, [], False
            for field, wire_type, value in _fields(payload):
                if field == 6 and wire_type == 2:
                    start = any(f == 1 and t == 0 and v == _SESSION_START for f, t, v in _fields(value))
                elif field == 2 and wire_type == 0:
                    step = value - (1 << 64) if value >= 1 << 63 else value
                elif field == 5 and wire_type == 2:
                    for vfield, vtype, v in _fields(value):
                        if vfield != 1 or vtype != 2:
                            continue
                        tag, simple = None, None
                        for f, t, x in _fields(v):
                            if f == 1 and t == 2:
                                tag = x.decode()
                            elif f == 2 and t == 5:
                                (simple,) = struct.unpack("<f", x)
                        if tag is not None and simple is not None:
                            values.append((tag, simple))
            if start:
                out = [point for point in out if point[0] < step]
            out.extend((step, tag, v) for tag, v in values)
    return out
