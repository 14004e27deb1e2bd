"""The tensors of one .safetensors file as views of a single file mapping, without the memory that
safetensors' own `get_tensor` keeps.

safetensors 0.8 (torch framework) keeps a little memory for good on every `get_tensor`: ~56 bytes
of Python objects and ~200 bytes of resident memory a call, against none for this reader
(`benchmarks/leak_checks.py`, docs/benchmarks.md "Soak"). The fleet reads every tensor of
an adapter at each registration (the NaN/Inf check, on the head) and each disk load (on a worker),
so churning adapters grew those processes without bound. Opening the file and checking its header
stay with safetensors (`safe_open`); this reader only turns a tensor name into a tensor: it parses
the same header, checks the entry (dtype, shape, byte range), and slices one
`torch.UntypedStorage.from_file` mapping of the file, as safetensors itself does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on the JSON header
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class MappedTensors:
    """Tensors by name; ValueError (naming the tensor, never its values) for a malformed entry."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is too short to hold a safetensors header")
            n = int.from_bytes(prefix, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"the header length ({n} bytes) runs past the file")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        self._entries: dict = header
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        self._storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries.get(key)
        if not isinstance(entry, dict):
            raise KeyError(f"no tensor {key!r} in the file")
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise ValueError(f"tensor {key} has an unsupported dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _ints(shape) or not (_ints(offsets) and len(offsets) == 2):
            raise ValueError(f"tensor {key} has a malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= self._data_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key}: its byte range does not fit its shape and dtype, or the file")
        start = self._data_start + begin
        raw = torch.empty(0, dtype=torch.uint8)
        raw.set_(self._storage[start : start + end - begin])  # a view of the mapping, no copy
        return raw.view(dtype).reshape(shape)


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
