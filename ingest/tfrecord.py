"""TFRecord files of tf.train.Example records, read without TensorFlow.

The PGDL competition's datasets (ingest/pgdl.py) are shards of records, each
an Example whose features `inputs` and `output` are tensors serialized with
tf.io.serialize_tensor. The framing and the two protobuf messages are small:

    record:  uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)
    Example { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      (entries: key = 1, value = 2)
    Feature { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; }
    BytesList { repeated bytes value = 1; }
    TensorProto { DataType dtype = 1; TensorShapeProto tensor_shape = 2;
                  bytes tensor_content = 4; repeated float float_val = 5 (packed);
                  repeated int32 int_val = 7 (packed); ... }
    TensorShapeProto { repeated Dim dim = 2; }   Dim { int64 size = 1; }

Every length and checksum is checked: a truncated or corrupt shard is named
with the record's index, never half read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fgm.warehouse import FgmError

# TensorFlow's DataType enum: the ones a PGDL shard holds
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
          9: np.dtype("<i8")}
_MASK_DELTA = 0xA282EAD8


def _crc32c():
    try:
        import google_crc32c
    except ImportError:
        raise FgmError("reading TFRecord shards needs google-crc32c (pip install "
                       "'fgm[pgdl]')") from None
    return google_crc32c.value


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def records(path: Path) -> Iterator[bytes]:
    """Each record's data, its length and both checksums verified, read one record at
    a time (a reader of the first records reads only those)."""
    crc = _crc32c()
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise FgmError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with f:
        at, index = 0, 0
        while True:
            header = f.read(12)
            if not header:
                return
            where = f"{path}, record {index} (byte {at})"
            if len(header) < 12:
                raise FgmError(f"{where}: truncated: {len(header)} bytes where a record's "
                               "12-byte header was expected")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if _masked(crc(header[:8])) != length_crc:
                raise FgmError(f"{where}: the length's checksum does not match (not a "
                               "TFRecord file, or corrupt)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise FgmError(f"{where}: truncated: the record says {length:,} bytes, the "
                               f"file has {max(0, len(data) + len(tail) - 4):,} left")
            (data_crc,) = struct.unpack("<I", tail)
            if _masked(crc(data)) != data_crc:
                raise FgmError(f"{where}: the data's checksum does not match (corrupt)")
            yield data
            at, index = at + 16 + length, index + 1


# --------------------------------------------------------------------------- protobuf

def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(buf):
            raise ValueError("a varint runs past the end")
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: an int for varints
    and fixed-width fields, the bytes for length-delimited ones."""
    at = 0
    while at < len(buf):
        key, at = _varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(buf, at)
        elif wire == 1:
            if at + 8 > len(buf):
                raise ValueError("a 64-bit field runs past the end")
            value, at = int.from_bytes(buf[at:at + 8], "little"), at + 8
        elif wire == 2:
            size, at = _varint(buf, at)
            if at + size > len(buf):
                raise ValueError("a length-delimited field runs past the end")
            value, at = buf[at:at + size], at + size
        elif wire == 5:
            if at + 4 > len(buf):
                raise ValueError("a 32-bit field runs past the end")
            value, at = int.from_bytes(buf[at:at + 4], "little"), at + 4
        else:
            raise ValueError(f"wire type {wire} is not one this reader knows")
        yield number, wire, value


def example_bytes(record: bytes) -> dict[str, bytes]:
    """An Example's features that hold one bytes value each: {name: bytes}."""
    out: dict[str, bytes] = {}
    for number, wire, features in fields(record):
        if number != 1 or wire != 2:
            continue
        for n2, w2, entry in fields(features):
            if n2 != 1 or w2 != 2:
                continue
            key, feature = None, None
            for n3, w3, v in fields(entry):
                if n3 == 1 and w3 == 2:
                    key = v.decode("utf-8")
                elif n3 == 2 and w3 == 2:
                    feature = v
            if key is None or feature is None:
                continue
            for n4, w4, value_list in fields(feature):
                if n4 == 1 and w4 == 2:     # BytesList
                    values = [v for n5, w5, v in fields(value_list) if n5 == 1 and w5 == 2]
                    if len(values) == 1:
                        out[key] = values[0]
    return out


def tensor(proto: bytes) -> np.ndarray:
    """A TensorProto as tf.io.serialize_tensor writes it, as a numpy array."""
    dtype, shape, content, packed = None, [], None, {}
    for number, wire, value in fields(proto):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            for n2, w2, dim in fields(value):
                if n2 == 2 and w2 == 2:
                    size = next((v for n3, w3, v in fields(dim) if n3 == 1 and w3 == 0), 0)
                    shape.append(size)
        elif number == 4 and wire == 2:
            content = value
        elif number in (5, 6, 7, 10) and wire == 2:
            packed[number] = value
        elif number in (5, 6, 7, 10):
            raise ValueError("unpacked repeated values are not supported")
    if dtype not in DTYPES:
        raise ValueError(f"tensor dtype {dtype} is not one of float32, float64, int32, "
                         "uint8, int64")
    kind = DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=kind)
    elif dtype == 1 and 5 in packed:
        array = np.frombuffer(packed[5], dtype="<f4")
    elif dtype == 2 and 6 in packed:
        array = np.frombuffer(packed[6], dtype="<f8")
    elif dtype in (3, 4) and 7 in packed:
        ints, at, buf = [], 0, packed[7]
        while at < len(buf):
            v, at = _varint(buf, at)
            ints.append(v - (1 << 64) if v >= 1 << 63 else v)
        array = np.asarray(ints, dtype=kind)
    else:
        array = np.zeros(0, dtype=kind)
    if array.size == 1 and count > 1:     # one value stands for all (TensorFlow's rule)
        array = np.full(count, array[0], dtype=kind)
    if array.size != count:
        raise ValueError(f"a tensor of shape {shape} holds {array.size} values")
    return array.reshape(shape).copy()


def read_examples(path: Path, features: tuple[str, ...],
                  limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every record of a shard (the first `limit`): {feature: array} for the named
    serialized-tensor features. FgmError names the shard and the record that is wrong."""
    out = []
    for index, record in enumerate(records(path)):
        if limit is not None and index >= limit:
            break
        try:
            got = example_bytes(record)
            missing = [f for f in features if f not in got]
            if missing:
                raise ValueError(f"no feature {', '.join(missing)} (it has "
                                 f"{', '.join(got) or 'none'})")
            out.append({f: tensor(got[f]) for f in features})
        except ValueError as exc:
            raise FgmError(f"{path}, record {index}: not a tf.train.Example of serialized "
                           f"tensors: {exc}") from None
    return out
