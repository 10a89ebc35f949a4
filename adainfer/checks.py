"""Bounded readers for the headers of files that come from strangers: safetensors and GGUF.

Nothing here trusts a count, a length or an offset before checking it against the file's size and sane limits,
so a crafted file fails in milliseconds with an AdainferError instead of making a reader loop or allocate without
end (the gguf package's reader, 0.19.0, does both on a 49-byte file whose one array claims 2**63 elements).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adainfer.errors import AdainferError

MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own bound
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_STRING = 1 << 24  # a key, a chat template or one vocabulary entry
MAX_ARRAY = 1 << 24  # elements in one metadata array (vocabularies are ~1e5)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40

SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major, outermost first (GGUF's dims reversed)
    dtype: str  # safetensors dtype name, or a GGML type name
    start: int  # absolute byte offset in the file
    nbytes: int


def check_safetensors(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header against its size; return its tensors by name."""
    path = Path(path)
    size = _file_size(path)
    if size < 8:
        raise AdainferError(path, f"truncated safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER:
            raise AdainferError(path, f"safetensors header claims {n} bytes (limit {MAX_SAFETENSORS_HEADER})")
        if 8 + n > size:
            raise AdainferError(path, f"truncated safetensors file: header needs {8 + n} bytes, file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdainferError(path, f"malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise AdainferError(path, "malformed safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise AdainferError(path, "malformed safetensors header: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdainferError(path, f"tensor {name!r}: header entry must hold exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise AdainferError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        shape = _check_shape(path, name, shape)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise AdainferError(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        nbytes = _numel(shape) * SAFETENSORS_DTYPES[dtype]
        if not begin <= end <= data_size:
            raise AdainferError(path, f"tensor {name!r}: bytes [{begin}, {end}) lie outside the data "
                                      f"({data_size} bytes; truncated file?)")
        if end - begin != nbytes:
            raise AdainferError(path, f"tensor {name!r}: {dtype} x {list(shape)} needs {nbytes} bytes, "
                                      f"offsets give {end - begin}")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, shape, dtype, 8 + n + begin, nbytes)
    _check_overlap(path, spans)
    return tensors


# ---------------------------------------------------------------- GGUF

GGUF_MAGIC = b"GGUF"
# value type -> struct format of a scalar (8 = string, 9 = array are handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # key -> value (scalars, str, or lists of them)
    tensors: dict[str, TensorInfo]
    types: dict[str, int]  # tensor name -> GGML type id


def read_gguf_header(path: Path) -> GGUFFile:
    """Parse and validate a GGUF file's header (metadata and tensor table) with every count bounded."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = _file_size(path)
    if size < 24:
        raise AdainferError(path, f"truncated GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, size, path)
        if r.take(4) != GGUF_MAGIC:
            raise AdainferError(path, "not a GGUF file (bad magic)")
        version = r.scalar("I")
        if version not in (2, 3):
            raise AdainferError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
        if n_tensors > MAX_TENSORS:
            raise AdainferError(path, f"GGUF claims {n_tensors} tensors (limit {MAX_TENSORS})")
        if n_kv > MAX_KV:
            raise AdainferError(path, f"GGUF claims {n_kv} metadata entries (limit {MAX_KV})")
        metadata = {}
        for _ in range(n_kv):
            key = r.string("metadata key")
            vtype = r.scalar("I")
            metadata[key] = r.value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            n_dims = r.scalar("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise AdainferError(path, f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [r.scalar("Q") for _ in range(n_dims)]
            ttype = r.scalar("I")
            offset = r.scalar("Q")
            infos.append((name, dims, ttype, offset))
        alignment = metadata.get("general.alignment", 32)
        if not (isinstance(alignment, int) and 0 < alignment <= 1 << 16 and alignment & (alignment - 1) == 0):
            raise AdainferError(path, f"general.alignment={alignment!r} is not a power of two up to 65536")
        data_start = -(-r.pos // alignment) * alignment
    data_size = size - data_start
    if data_size < 0:
        raise AdainferError(path, "truncated GGUF file: no room for tensor data")
    tensors, types, spans = {}, {}, []
    for name, dims, ttype, offset in infos:
        if name in tensors:
            raise AdainferError(path, f"tensor {name!r} appears twice")
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise AdainferError(path, f"tensor {name!r}: unknown GGML type {ttype}") from None
        if any(d == 0 or d > MAX_ELEMENTS for d in dims) or _numel(dims) > MAX_ELEMENTS:
            raise AdainferError(path, f"tensor {name!r}: dims {dims} out of range")
        if dims[0] % block:
            raise AdainferError(path, f"tensor {name!r}: first dim {dims[0]} is not a multiple of the "
                                      f"{qtype.name} block size {block}")
        nbytes = _numel(dims) // block * type_size
        if offset % alignment:
            raise AdainferError(path, f"tensor {name!r}: offset {offset} is not {alignment}-aligned")
        if offset + nbytes > data_size:
            raise AdainferError(path, f"tensor {name!r}: bytes [{offset}, {offset + nbytes}) lie outside the "
                                      f"tensor data ({data_size} bytes; truncated file?)")
        spans.append((offset, offset + nbytes, name))
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype.name, data_start + offset, nbytes)
        types[name] = ttype
    _check_overlap(path, spans)
    return GGUFFile(path, version, metadata, tensors, types)


class _Reader:
    """Little-endian cursor over a buffer that refuses to read past its end."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise AdainferError(self.path, f"truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                                           f"file has {self.size}")

    def take(self, n: int) -> bytes:
        self.need(n, "header")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, "a number")
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q")
        if n > MAX_STRING:
            raise AdainferError(self.path, f"{what} claims {n} bytes (limit {MAX_STRING})")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AdainferError(self.path, f"{what} at offset {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, key: str):
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype != _ARRAY:
            raise AdainferError(self.path, f"metadata {key!r}: unknown value type {vtype}")
        etype, count = self.scalar("I"), self.scalar("Q")
        if count > MAX_ARRAY:
            raise AdainferError(self.path, f"metadata {key!r}: array claims {count} elements (limit {MAX_ARRAY})")
        if etype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[etype]
            n = count * struct.calcsize(fmt)
            self.need(n, f"array {key!r}")
            out = np.frombuffer(self.buf, dtype=np.dtype("<" + fmt), count=count, offset=self.pos).tolist()
            self.pos += n
            return out
        if etype == _STRING:
            self.need(count * 8, f"array {key!r}")  # every string has at least its 8-byte length
            return [self.string(f"element of {key!r}") for _ in range(count)]
        raise AdainferError(self.path, f"metadata {key!r}: arrays of type {etype} are not supported")


# ---------------------------------------------------------------- shared


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise AdainferError(path, f"cannot read: {e.strerror}") from None


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_shape(path: Path, name: str, shape) -> tuple[int, ...]:
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_uint(d) for d in shape)):
        raise AdainferError(path, f"tensor {name!r}: shape must be a list of at most 8 non-negative integers")
    if _numel(shape) > MAX_ELEMENTS:
        raise AdainferError(path, f"tensor {name!r}: shape {shape} is too large")
    return tuple(shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_overlap(path: Path, spans: list) -> None:
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise AdainferError(path, f"tensors {a!r} and {b!r} overlap")
