"""Header checks refuse crafted files fast, before any reader walks them."""

import json
import struct
import time

import pytest

from adainfer.checks import check_safetensors, read_gguf_header
from adainfer.errors import AdainferError


def crafted_gguf_huge_array() -> bytes:
    """The 49-byte GGUF that makes gguf 0.19.0's reader loop and grow without end: one array of 2**63 elements."""
    key = b"k"
    return (b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 9) + struct.pack("<I", 0) + struct.pack("<Q", 2**63))


def test_crafted_gguf_refused_fast(tmp_path):
    f = tmp_path / "evil.gguf"
    f.write_bytes(crafted_gguf_huge_array())
    assert f.stat().st_size == 49
    t0 = time.perf_counter()
    with pytest.raises(AdainferError, match="array claims"):
        read_gguf_header(f)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("blob, needle", [
    (b"", "truncated"),
    (b"GGUF" + struct.pack("<I", 7) + bytes(16), "version"),
    (b"GGML" + bytes(20), "bad magic"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "tensors"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62), "claims"),
])
def test_bad_gguf_headers(tmp_path, blob, needle):
    f = tmp_path / "bad.gguf"
    f.write_bytes(blob)
    with pytest.raises(AdainferError, match=needle):
        read_gguf_header(f)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, data, needle", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "outside"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(16), "needs 16 bytes"),
    ({"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(16), "overlap"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
])
def test_bad_safetensors_headers(tmp_path, header, data, needle):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(AdainferError, match=needle):
        check_safetensors(f)


def test_safetensors_header_length_bounded(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(AdainferError, match="header claims"):
        check_safetensors(f)
