"""Streaming safetensors: read one tensor at a time, write a file tensor by
tensor, copy untouched tensors byte for byte.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``, offsets relative to the end of the header), then the data.

:class:`SafetensorsFile` parses and validates the header (every offset inside
the file, sizes matching shape x dtype, no overlaps), so that a truncated or
corrupt file is reported before any output is written, and reads single
tensors with ``os.pread`` (nothing else of the file is loaded).
:class:`SafetensorsWriter` lays out the whole header first (every tensor's
dtype and shape is known in advance), then takes the tensors in order.
When a file's tensors keep their dtypes and shapes, the writer reuses the
input header bytes verbatim, so an unchanged tensor set gives an identical
file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError

# Largest header we accept (the reference implementation's limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

# safetensors dtype -> (numpy dtype used to carry the bytes, mlx dtype)
_TO_MX = {
    "BOOL": (np.bool_, mx.bool_),
    "U8": (np.uint8, mx.uint8), "I8": (np.int8, mx.int8),
    "U16": (np.uint16, mx.uint16), "I16": (np.int16, mx.int16),
    "U32": (np.uint32, mx.uint32), "I32": (np.int32, mx.int32),
    "U64": (np.uint64, mx.uint64), "I64": (np.int64, mx.int64),
    "F16": (np.float16, mx.float16), "F32": (np.float32, mx.float32),
    "BF16": (np.uint16, mx.bfloat16),  # no numpy bf16: carried as uint16 bits
    "C64": (np.complex64, mx.complex64),
}
_FROM_MX = {mxd: st for st, (_, mxd) in _TO_MX.items()}


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes from ``src_fd`` at ``offset`` to ``dst_fd``'s
    current position inside the kernel (copy_file_range, else sendfile)."""
    if hasattr(os, "copy_file_range"):
        return os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
    return os.sendfile(dst_fd, src_fd, offset, min(count, 1 << 30))


_FILE_COPY = _copy_range if (hasattr(os, "copy_file_range") or hasattr(os, "sendfile")) else None


class SafetensorsError(UserError):
    """A safetensors file is missing, unreadable, truncated or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # data offsets, relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_of(array: mx.array) -> str:
    """The safetensors dtype name of an MLX array."""
    try:
        return _FROM_MX[array.dtype]
    except KeyError:
        raise SafetensorsError(f"dtype {array.dtype} cannot be written to safetensors") from None


def nbytes_of(dtype: str, shape) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


class SafetensorsFile:
    """A validated safetensors file; tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such file") from None
        except OSError as err:
            raise SafetensorsError(f"{self.path}: cannot read ({err.strerror})") from None
        try:
            self._parse()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _fail(self, why: str):
        raise SafetensorsError(f"{self.path}: {why}")

    def _parse(self):
        self.file_size = os.fstat(self._fd).st_size
        if self.file_size < 8:
            self._fail(f"truncated or not a safetensors file ({self.file_size} bytes)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER_BYTES or 8 + n > self.file_size:
            self._fail(f"corrupt or truncated safetensors header (declares {n} header bytes, "
                       f"file has {self.file_size})")
        raw = os.pread(self._fd, n, 8)
        if len(raw) != n:
            self._fail("truncated safetensors header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self._fail(f"corrupt safetensors header ({err})")
        if not isinstance(header, dict):
            self._fail("corrupt safetensors header (not a JSON object)")
        self.header_bytes = raw
        self.data_offset = 8 + n
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            self._fail("corrupt safetensors header (__metadata__ is not an object)")
        self.metadata = meta
        tensors: dict[str, TensorInfo] = {}
        data_size = self.file_size - self.data_offset
        for name, entry in header.items():
            try:
                dtype = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self._fail(f"corrupt safetensors header entry for {name!r}")
            if dtype not in ITEMSIZE:
                self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
            if any(d < 0 for d in shape) or not 0 <= begin <= end:
                self._fail(f"tensor {name!r} has an invalid shape or offsets")
            if end - begin != nbytes_of(dtype, shape):
                self._fail(f"tensor {name!r}: {end - begin} bytes for {dtype} {list(shape)} "
                           f"(expected {nbytes_of(dtype, shape)})")
            if end > data_size:
                self._fail(f"truncated: tensor {name!r} ends at byte {self.data_offset + end} "
                           f"but the file has {self.file_size} bytes")
            tensors[name] = TensorInfo(name, dtype, shape, begin, end)
        # the data order (offsets) is the order we write back in
        ordered = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
        for prev, cur in zip(ordered, ordered[1:]):
            if cur.begin < prev.end:
                self._fail(f"corrupt header: tensors {prev.name!r} and {cur.name!r} overlap")
        self.tensors = {t.name: t for t in ordered}

    # -- reading ----------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        info = self.tensors[name]
        if length is None:
            length = info.nbytes - start
        data = os.pread(self._fd, length, self.data_offset + info.begin + start)
        if len(data) != length:  # the file shrank after it was opened
            self._fail(f"truncated while reading tensor {name!r}")
        return data

    def read(self, name: str) -> mx.array:
        """One tensor as an (evaluated) MLX array."""
        info = self.tensors[name]
        return bytes_to_array(self.read_bytes(name), info.dtype, info.shape, what=f"{self.path}:{name}")

    def fileno(self) -> int:
        return self._fd

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def bytes_to_array(data, dtype: str, shape, what: str = "tensor") -> mx.array:
    if dtype not in _TO_MX:
        raise SafetensorsError(f"{what}: dtype {dtype} is not supported by MLX")
    np_dtype, mx_dtype = _TO_MX[dtype]
    arr = mx.array(np.frombuffer(data, dtype=np_dtype).reshape(shape))
    if dtype == "BF16":
        arr = arr.view(mx.bfloat16)
    mx.eval(arr)
    return arr


def array_to_bytes(array: mx.array) -> memoryview:
    """The raw little-endian bytes of an MLX array (row-major)."""
    dtype_of(array)  # raises for unsupported dtypes
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8))


def build_header(entries, metadata: dict | None) -> bytes:
    """Header JSON (padded with spaces to a multiple of 8 bytes) for
    ``entries``: ``(name, dtype, shape)`` in data order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        n = nbytes_of(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(8 + len(raw)) % 8)


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known in advance.

    ``entries`` is ``[(name, dtype, shape), ...]`` in data order; tensors must
    then be given in that order with :meth:`write` (an MLX array or raw bytes)
    or :meth:`copy_from` (raw bytes of another file, in chunks).
    ``header_bytes`` reuses an existing header verbatim; it must describe the
    same entries (checked)."""

    def __init__(self, path, entries, metadata: dict | None = None, header_bytes: bytes | None = None):
        self.path = Path(path)
        self.entries = [(n, d, tuple(s)) for n, d, s in entries]
        if header_bytes is None:
            header_bytes = build_header(self.entries, metadata)
        else:
            parsed = json.loads(header_bytes)
            parsed.pop("__metadata__", None)
            offset = 0
            for name, dtype, shape in self.entries:
                e = parsed.get(name)
                n = nbytes_of(dtype, shape)
                if e is None or e["dtype"] != dtype or tuple(e["shape"]) != shape \
                        or list(e["data_offsets"]) != [offset, offset + n]:
                    raise ValueError(f"header_bytes do not describe {name!r} as planned")
                offset += n
        self._index = 0
        # unbuffered: raw bytes are also copied file-to-file in the kernel
        self._file = open(self.path, "xb", buffering=0)
        self._put(struct.pack("<Q", len(header_bytes)) + header_bytes)

    def _put(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = self._file.write(view)
            view = view[n:]

    def _next(self, name: str) -> tuple[str, str, tuple]:
        if self._index >= len(self.entries):
            raise ValueError(f"{self.path}: unexpected tensor {name!r} (all planned tensors written)")
        entry = self.entries[self._index]
        if entry[0] != name:
            raise ValueError(f"{self.path}: expected tensor {entry[0]!r} next, got {name!r}")
        self._index += 1
        return entry

    def write(self, name: str, data) -> None:
        """Write the next tensor from an MLX array (dtype and shape checked)
        or from bytes."""
        _, dtype, shape = self._next(name)
        if isinstance(data, mx.array):
            if dtype_of(data) != dtype or tuple(data.shape) != shape:
                raise ValueError(f"{name}: planned {dtype} {list(shape)}, got {dtype_of(data)} "
                                 f"{list(data.shape)}")
            data = array_to_bytes(data)
        if memoryview(data).nbytes != nbytes_of(dtype, shape):
            raise ValueError(f"{name}: {memoryview(data).nbytes} bytes, planned {nbytes_of(dtype, shape)}")
        self._put(data)

    def copy_from(self, src: SafetensorsFile, name: str, src_name: str | None = None) -> None:
        """Copy a tensor's raw bytes from ``src`` without decoding them."""
        _, dtype, shape = self._next(name)
        info = src.tensors[src_name or name]
        if info.dtype != dtype or info.shape != shape:
            raise ValueError(f"{name}: planned {dtype} {list(shape)}, source has {info.dtype} "
                             f"{list(info.shape)}")
        offset, left = src.data_offset + info.begin, info.nbytes
        out_fd = self._file.fileno()
        while left and _FILE_COPY is not None:  # in-kernel copy, no trip through user space
            try:
                n = _FILE_COPY(src.fileno(), out_fd, offset, left)
            except OSError:
                break
            if n <= 0:
                break
            offset, left = offset + n, left - n
        done = info.nbytes - left
        for start in range(done, info.nbytes, COPY_CHUNK):
            self._put(src.read_bytes(src_name or name, start, min(COPY_CHUNK, info.nbytes - start)))

    def close(self, fsync: bool = True) -> None:
        if self._file is None:
            return
        if self._index != len(self.entries):
            missing = self.entries[self._index][0]
            self.abort()
            raise ValueError(f"{self.path}: closed before tensor {missing!r} was written")
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def load_all(path) -> dict[str, mx.array]:
    """Every tensor of a (small) file, e.g. adapters.safetensors."""
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f.keys()}
