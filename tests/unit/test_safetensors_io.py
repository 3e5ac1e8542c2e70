"""pyfuse.io.safetensors against MLX's own writer/reader and the safetensors
package (independent implementations of the format)."""

from __future__ import annotations

import json
import os
import struct

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.errors import UserError
from pyfuse.io.safetensors import (SafetensorsError, SafetensorsFile, SafetensorsWriter,
                                   array_to_bytes, dtype_of, load_all)


def _sample():
    mx.random.seed(3)
    return {
        "f32": mx.random.normal((3, 5)),
        "f16": mx.random.normal((4,)).astype(mx.float16),
        "bf16": mx.random.normal((2, 3, 4)).astype(mx.bfloat16),
        "u32": mx.random.randint(0, 2**31, (7, 2)).astype(mx.uint32),
        "i8": mx.array([-3, 0, 5], dtype=mx.int8),
        "u8": mx.array([1, 2, 255], dtype=mx.uint8),
        "i64": mx.array([2**40, -1], dtype=mx.int64),
        "bool": mx.array([True, False, True]),
        "empty": mx.zeros((0, 4)),
        "scalar": mx.array(2.5),
    }


def _same(x: mx.array, y: mx.array) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return bytes(array_to_bytes(x)) == bytes(array_to_bytes(y))


def test_reads_what_mlx_writes(tmp_path):
    tensors = _sample()
    path = tmp_path / "a.safetensors"
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "mlx"}
    assert set(f.keys()) == set(tensors)
    for name, ref in tensors.items():
        got = f.read(name)
        assert _same(got, ref), name
        assert f.tensors[name].dtype == dtype_of(ref)
    f.close()


def test_writer_output_loads_in_mlx_and_safetensors(tmp_path):
    tensors = _sample()
    path = tmp_path / "w.safetensors"
    entries = [(n, dtype_of(a), a.shape) for n, a in tensors.items()]
    with SafetensorsWriter(path, entries, metadata={"format": "mlx"}) as w:
        for name, a in tensors.items():
            w.write(name, a)
    loaded, meta = mx.load(str(path), return_metadata=True)
    assert meta == {"format": "mlx"}
    for name, ref in tensors.items():
        assert _same(loaded[name], ref), name
    # an independent reader (the safetensors package) agrees on every non-bf16 tensor
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as st:
        assert st.metadata() == {"format": "mlx"}
        for name, ref in tensors.items():
            if ref.dtype == mx.bfloat16:  # numpy has no bfloat16
                continue
            np.testing.assert_array_equal(st.get_tensor(name), np.array(ref))
    # the header is padded to 8 bytes (spec recommendation)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0


def test_copy_with_reused_header_is_byte_identical(tmp_path):
    src = tmp_path / "src.safetensors"
    mx.save_safetensors(str(src), _sample(), metadata={"format": "mlx"})
    f = SafetensorsFile(src)
    dst = tmp_path / "dst.safetensors"
    entries = [(t.name, t.dtype, t.shape) for t in f.tensors.values()]
    with SafetensorsWriter(dst, entries, header_bytes=f.header_bytes) as w:
        for i, name in enumerate(f.tensors):
            if i % 2:
                w.copy_from(f, name)
            else:
                w.write(name, f.read(name))  # decoded and re-encoded
    assert dst.read_bytes() == src.read_bytes()


def test_writer_checks_order_dtype_shape_and_completeness(tmp_path):
    entries = [("a", "F32", (2,)), ("b", "U32", (3,))]
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        with SafetensorsWriter(tmp_path / "x1", entries) as w:
            w.write("b", mx.zeros((3,), dtype=mx.uint32))
    with pytest.raises(ValueError, match="planned F32"):
        with SafetensorsWriter(tmp_path / "x2", entries) as w:
            w.write("a", mx.zeros((3,)))
    w = SafetensorsWriter(tmp_path / "x3", entries)
    w.write("a", mx.zeros((2,)))
    with pytest.raises(ValueError, match="closed before tensor 'b'"):
        w.close()
    with pytest.raises(ValueError, match="do not describe"):
        SafetensorsWriter(tmp_path / "x4", entries, header_bytes=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    # never overwrites
    with pytest.raises(FileExistsError):
        SafetensorsWriter(tmp_path / "x3", entries)


def _write_raw(path, header: dict | bytes, data: bytes = b"", declared_len=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.mark.parametrize("case, message", [
    ("truncated_data", "truncated: tensor 'w' ends at byte"),
    ("short_file", "truncated or not a safetensors file"),
    ("huge_header_len", "corrupt or truncated safetensors header"),
    ("bad_json", "corrupt safetensors header"),
    ("not_object", "not a JSON object"),
    ("bad_dtype", "unknown dtype"),
    ("size_mismatch", "expected 16"),
    ("overlap", "overlap"),
    ("missing_field", "corrupt safetensors header entry"),
])
def test_corrupt_files_are_refused(tmp_path, case, message):
    p = tmp_path / "bad.safetensors"
    good = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    if case == "truncated_data":
        _write_raw(p, good, b"\0" * 10)
    elif case == "short_file":
        p.write_bytes(b"\1\2\3")
    elif case == "huge_header_len":
        _write_raw(p, good, b"\0" * 16, declared_len=10**6)
    elif case == "bad_json":
        _write_raw(p, b"{not json", b"")
    elif case == "not_object":
        _write_raw(p, b"[1, 2]", b"")
    elif case == "bad_dtype":
        _write_raw(p, {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    elif case == "size_mismatch":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16)
    elif case == "overlap":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16)
    elif case == "missing_field":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=message) as err:
        SafetensorsFile(p)
    assert isinstance(err.value, UserError)  # the CLI turns it into exit 2
    assert str(p) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SafetensorsError, match="no such file"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def test_reading_one_tensor_reads_only_its_bytes(tmp_path, monkeypatch):
    """Reading a tensor must not load the rest of the file: every byte read
    from the file (SafetensorsFile reads with os.pread) lies in that tensor's
    data, and all of it is read once."""
    tensors = {"a": mx.arange(1 << 18, dtype=mx.float32), "b": mx.ones((10,)),
               "c": mx.arange(1 << 17, dtype=mx.float32)}
    p = tmp_path / "t.safetensors"
    mx.save_safetensors(str(p), tensors)
    f = SafetensorsFile(p)
    reads = []
    real = os.pread

    def spy(fd, n, offset):
        data = real(fd, n, offset)
        reads.append((offset, offset + len(data)))
        return data

    monkeypatch.setattr(os, "pread", spy)
    got = f.read("b")
    monkeypatch.undo()
    f.close()
    info = f.tensors["b"]
    assert mx.array_equal(got, tensors["b"]).item()
    # the ranges read, put end to end, are exactly b's bytes
    start, end = f.data_offset + info.begin, f.data_offset + info.end
    assert sorted(reads)[0][0] == start and sum(e - s for s, e in reads) == end - start
    assert all(start <= s <= e <= end for s, e in reads)


def test_load_all_matches_mx_load(tmp_path):
    p = tmp_path / "s.safetensors"
    mx.save_safetensors(str(p), _sample())
    ref = mx.load(str(p))
    got = load_all(p)
    assert set(got) == set(ref)
    assert all(_same(got[k], ref[k]) for k in ref)
