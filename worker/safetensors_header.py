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


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of repeated names; a file that names a tensor twice is ambiguous.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"header names {key[:200]!r} twice")
        out[key] = value
    return out


def _entry(name: str, raw: object, data_start: int, data_len: int) -> TensorEntry:
    label = repr(name[:200])
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"tensor {label}: an entry needs exactly dtype, shape and data_offsets")
    dtype = _DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise HeaderError(f"tensor {label}: unsupported dtype {str(raw['dtype'])[:32]!r}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HeaderError(f"tensor {label}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise HeaderError(f"tensor {label}: data_offsets must be [begin, end] inside the data section")
    span = offsets[1] - offsets[0]
    if math.prod(shape) * dtype.itemsize != span:
        raise HeaderError(f"tensor {label}: data_offsets span {span} bytes, not what shape and dtype need")
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
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
    # The byte ranges tile the data section: no gaps, no overlaps, nothing after the last tensor.
    at = data_start
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != at:
            raise HeaderError(f"tensor {name[:200]!r}: data_offsets leave a gap or overlap another tensor")
        at = e.end
    if at != size:
        raise HeaderError(f"the tensors cover {at - data_start} of the {data_len} data bytes")
    return entries
