"""Parse and check a safetensors file's header: every tensor's dtype, shape and byte range.

The ``safetensors`` package reads tensors but does not say where their bytes lie in the file, which
the adapter reader needs to copy them straight from the file into place. The checks are the
format's own (as the ``safetensors`` package applies them), since the file is untrusted input: a
bounded header length, a JSON object of well-formed entries, and byte ranges that tile the data
section exactly, each as long as its shape and dtype say.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

# The format's limit on the header (the safetensors package refuses longer ones too).
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
# Dtype names of the format that torch can hold. Newer torch releases add more float8 kinds.
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file (the message says what is wrong)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its dtype, shape and its bytes' absolute range ``[start, end)`` in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_INT_ONLY = {int}  # type() of a JSON number without a fraction; bool is not accepted as a size


def _entry(name: str, raw: object, data_start: int, data_len: int) -> TensorEntry:
    # Runs once per tensor (hundreds per adapter) on the loader thread, holding Python's lock: the
    # checks use C-level loops (set, map) rather than generator expressions.
    label = name[:200]
    if type(raw) is not dict or raw.keys() != _ENTRY_KEYS:
        raise HeaderError(f"tensor {label!r}: an entry needs exactly dtype, shape and data_offsets")
    dtype_name, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise HeaderError(f"tensor {label!r}: unsupported dtype {str(dtype_name)[:32]!r}")
    if type(shape) is not list or not set(map(type, shape)) <= _INT_ONLY or (shape and min(shape) < 0):
        raise HeaderError(f"tensor {label!r}: shape must be a list of non-negative integers")
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or not set(map(type, offsets)) <= _INT_ONLY
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise HeaderError(f"tensor {label!r}: data_offsets must be [begin, end] inside the data section")
    span = offsets[1] - offsets[0]
    if math.prod(shape) * dtype.itemsize != span:
        raise HeaderError(f"tensor {label!r}: data_offsets span {span} bytes, not what shape and dtype need")
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header(fd: int) -> dict[str, TensorEntry]:
    """The tensors of the open safetensors file ``fd``, by name; raises HeaderError or OSError."""
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        raise HeaderError(f"file is {size} bytes, too short for a header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if 8 + header_len > size:
        raise HeaderError(f"header length {header_len} runs past the end of the {size}-byte file")
    raw = os.pread(fd, header_len, 8)
    if len(raw) != header_len:
        raise HeaderError("file shrank while its header was read")
    if not raw.startswith(b"{"):
        raise HeaderError("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(f"{_METADATA_KEY} must map names to strings")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = {name: _entry(name, raw, data_start, data_len) for name, raw in header.items()}
    # The byte ranges tile the data section: no gaps, no overlaps, nothing after the last tensor. (A
    # name repeated in the JSON keeps its last entry; the other one's bytes then leave a gap, unless
    # both name the same bytes, so the file cannot be read two ways.)
    at = data_start
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != at:
            raise HeaderError(f"tensor {name[:200]!r}: data_offsets leave a gap or overlap another tensor")
        at = e.end
    if at != size:
        raise HeaderError(f"the tensors cover {at - data_start} of the {data_len} data bytes")
    return entries
