"""edm_jax.tensorboard: the TFRecord/Event encoding, the reader, and the wiring into train._Logs."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from edm_jax import tensorboard as tb


def _only_events_file(folder):
    files = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    assert len(files) == 1, files
    return files[0]


def test_crc32c_known_vectors():
    assert tb.crc32c(b"123456789") == 0xE3069283
    assert tb.crc32c(b"") == 0
    assert tb.crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tb.crc32c(b"6789", tb.crc32c(b"12345")) == 0xE3069283  # continuation


def test_round_trip(tmp_path):
    with tb.SummaryWriter(str(tmp_path)) as writer:
        writer.scalar("loss", 0.125, step=1)
        writer.scalars({"loss": 0.1, "lr": 1e-4, "img/s": 1234.5}, step=10)
        writer.scalars({"loss": -3.0, "count": 7}, step=20)
    path = _only_events_file(str(tmp_path))
    assert os.path.basename(path).startswith("events.out.tfevents.")
    got = tb.read_scalars(path)
    f32 = lambda x: float(np.float32(x))
    assert got == [(1, "loss", 0.125), (10, "loss", f32(0.1)), (10, "lr", f32(1e-4)), (10, "img/s", 1234.5),
                   (20, "loss", -3.0), (20, "count", 7.0)]
    assert tb.read_scalars(str(tmp_path)) == got  # a folder reads all its files

    # The first record is the file version, with the Event framing TensorBoard expects.
    first = next(tb.read_records(path))
    fields = {f: v for f, _, v in tb._fields(first)}
    assert fields[3] == b"brain.Event:2"
    assert isinstance(struct.unpack("<d", fields[1])[0], float)


def test_large_and_negative_steps(tmp_path):
    steps = [0, 127, 128, 2**31 - 1, 2**31, 2**32 + 5, 2**62, -1]
    with tb.SummaryWriter(str(tmp_path)) as writer:
        for step in steps:
            writer.scalar("x", 1.5, step)
    assert [s for s, _, _ in tb.read_scalars(str(tmp_path))] == steps
    assert tb._varint(2**31) == b"\x80\x80\x80\x80\x08"
    assert len(tb._varint(-1)) == 10


@pytest.mark.parametrize("where", ["length_crc", "payload"])
def test_corruption_is_detected(tmp_path, where):
    with tb.SummaryWriter(str(tmp_path)) as writer:
        writer.scalars({"loss": 0.5}, step=3)
    path = _only_events_file(str(tmp_path))
    data = bytearray(open(path, "rb").read())
    (first_len,) = struct.unpack("<Q", data[:8])
    second = 16 + first_len  # start of the second record
    index = second + 8 if where == "length_crc" else len(data) - 6  # a byte of the CRC / of the payload
    data[index] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        tb.read_scalars(path)


def test_truncated_file_is_detected(tmp_path):
    with tb.SummaryWriter(str(tmp_path)) as writer:
        writer.scalars({"loss": 0.5}, step=3)
    path = _only_events_file(str(tmp_path))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        tb.read_scalars(path)


def test_tensorboard_reads_it(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with tb.SummaryWriter(str(tmp_path)) as writer:
        writer.scalars({"loss": 0.25, "lr": 2e-4}, step=5)
        writer.scalars({"loss": 0.125, "lr": 2e-4}, step=2**33)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(5, 0.25), (2**33, 0.125)]


def _protobuf_event_class():
    """tensorflow's Event/Summary messages (the fields used here), built at run time with the protobuf runtime."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="edm_jax_test_event.proto", package="edm_jax_test",
                                               syntax="proto3")

    def message(name, fields):
        m = proto.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Value", [("tag", 1, F.TYPE_STRING, opt, None), ("simple_value", 2, F.TYPE_FLOAT, opt, None)])
    message("Summary", [("value", 1, F.TYPE_MESSAGE, rep, ".edm_jax_test.Value")])
    message("SessionLog", [("status", 1, F.TYPE_INT32, opt, None)])  # an enum on the wire: START = 1
    message("Event", [("wall_time", 1, F.TYPE_DOUBLE, opt, None), ("step", 2, F.TYPE_INT64, opt, None),
                      ("file_version", 3, F.TYPE_STRING, opt, None),
                      ("summary", 5, F.TYPE_MESSAGE, opt, ".edm_jax_test.Summary"),
                      ("session_log", 6, F.TYPE_MESSAGE, opt, ".edm_jax_test.SessionLog")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("edm_jax_test.Event"))


def test_protobuf_runtime_decodes_events(tmp_path):
    Event = _protobuf_event_class()
    with tb.SummaryWriter(str(tmp_path)) as writer:
        writer.scalars({"loss": 0.25, "lr": 2e-4}, step=2**33, wall_time=1234.5)
        writer.scalars({"loss": 0.5}, step=-2)
    events = [Event.FromString(r) for r in tb.read_records(_only_events_file(str(tmp_path)))]
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 0
    assert (events[1].step, events[1].wall_time) == (2**33, 1234.5)
    assert [(v.tag, v.simple_value) for v in events[1].summary.value] == [("loss", 0.25),
                                                                          ("lr", float(np.float32(2e-4)))]
    assert events[2].step == -2 and events[2].summary.value[0].simple_value == 0.5


def test_train_logs_write_scalars(tmp_path):
    from edm_jax.train import _Logs

    workdir = str(tmp_path)
    logs = _Logs(workdir, active=True)
    try:
        logs.metrics({"step": 1, "tick": 0, "kimg": 0.5, "loss": 2.5, "lr": 0.0, "ema_beta": 0.0,
                      "nonfinite_grads": 0.0, "img_per_sec": 100, "note": "text",
                      "flag": True, "time": 1700000000.0})
        logs.metrics({"step": 10, "tick": 1, "kimg": 5.0, "loss": 1.5, "lr": 1e-3, "ema_beta": 0.99,
                      "nonfinite_grads": 2.0, "img_per_sec": 200.0, "time": 1700000010.0})
    finally:
        logs.close()
    path = _only_events_file(os.path.join(workdir, "tensorboard"))
    got = {(step, tag): value for step, tag, value in tb.read_scalars(path)}
    f32 = lambda x: float(np.float32(x))
    assert got == {
        (1, "tick"): 0.0, (1, "kimg"): 0.5, (1, "loss"): 2.5, (1, "lr"): 0.0, (1, "ema_beta"): 0.0,
        (1, "nonfinite_grads"): 0.0, (1, "img_per_sec"): 100.0,
        (10, "tick"): 1.0, (10, "kimg"): 5.0, (10, "loss"): 1.5, (10, "lr"): f32(1e-3), (10, "ema_beta"): f32(0.99),
        (10, "nonfinite_grads"): 2.0, (10, "img_per_sec"): 200.0,
    }
    # The record's time is the event's wall time; metrics.jsonl is written as before.
    records = list(tb.read_records(path))[1:]
    wall = [struct.unpack("<d", {f: v for f, _, v in tb._fields(r)}[1])[0] for r in records]
    assert wall == [1700000000.0, 1700000010.0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert len(f.read().splitlines()) == 2


def test_train_logs_inactive_writes_nothing(tmp_path):
    from edm_jax.train import _Logs

    logs = _Logs(str(tmp_path), active=False)
    logs.metrics({"step": 1, "loss": 1.0})
    logs.close()
    assert not os.path.exists(os.path.join(str(tmp_path), "tensorboard"))


def test_purge_step_is_a_session_start_event(tmp_path):
    """tensorboardX's purge_step: a SessionLog START event at that step, right after the file version."""
    Event = _protobuf_event_class()
    with tb.SummaryWriter(str(tmp_path), purge_step=41) as writer:
        writer.scalars({"loss": 0.5}, step=41)
    events = [Event.FromString(r) for r in tb.read_records(_only_events_file(str(tmp_path)))]
    assert events[0].file_version == "brain.Event:2" and not events[0].HasField("session_log")
    assert (events[1].step, events[1].session_log.status, events[1].HasField("summary")) == (41, 1, False)
    assert events[2].step == 41 and not events[2].HasField("session_log")


def test_resumed_train_logs_show_no_duplicate_steps(tmp_path):
    """A run logs steps 10-50 and dies; the resumed one restores step 30 and logs 40-60 again. Readers see
    each step once, with the resumed run's value (metrics.jsonl likewise)."""
    from edm_jax.train import _Logs

    def run(steps, loss, restored=None):
        logs = _Logs(str(tmp_path), active=True)
        try:
            if restored is not None:
                logs.truncate_metrics(restored)
            for step in steps:
                logs.metrics({"step": step, "loss": loss})
        finally:
            logs.close()

    run(range(10, 60, 10), loss=1.0)
    run(range(40, 70, 10), loss=2.0, restored=30)
    got = [(step, value) for step, tag, value in tb.read_scalars(os.path.join(str(tmp_path), "tensorboard"))]
    assert got == [(10, 1.0), (20, 1.0), (30, 1.0), (40, 2.0), (50, 2.0), (60, 2.0)]
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [10, 20, 30, 40, 50, 60]
