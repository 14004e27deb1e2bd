"""MappedTensors: safetensors' tensors, byte for byte, without the memory its get_tensor keeps."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafleet.worker.mapped_tensors import MappedTensors


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(
        {
            "f32": torch.randn(3, 5),
            "bf16": torch.randn(4, 2).to(torch.bfloat16),
            "f16": torch.randn(2, 3).half(),
            "i64": torch.arange(7),
            "flags": torch.tensor([True, False, True]),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(3.0),
        },
        str(path),
    )
    return path


def test_same_tensors_as_safetensors(weights: Path) -> None:
    mapped = MappedTensors(weights)
    with safe_open(str(weights), framework="pt") as f:
        keys = sorted(f.keys())
        assert sorted(mapped.keys()) == keys
        for key in keys:
            ours, theirs = mapped.get_tensor(key), f.get_tensor(key)
            assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), key
            assert torch.equal(ours, theirs), key
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        mapped.get_tensor("nope")


def test_reading_keeps_no_memory(weights: Path) -> None:
    def read_all() -> None:
        mapped = MappedTensors(weights)
        for key in list(mapped.keys()):
            mapped.get_tensor(key)

    for _ in range(50):
        read_all()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(2000):
            read_all()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # safetensors' get_tensor keeps ~57 bytes a call: 2000 x 7 calls would be ~800 KB.
    assert kept < 50_000, kept


def _with_header(path: Path, header: object, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "key", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, "t", "byte range"),
        ({"t": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "t", "byte range"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, "t", "byte range"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "t", "unsupported dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "t", "malformed shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "t", "malformed shape"),
        ({"t": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "t", "malformed shape"),
    ],
)
def test_malformed_entries_name_the_tensor(tmp_path: Path, header: dict, key: str, message: str) -> None:
    mapped = MappedTensors(_with_header(tmp_path / "bad.safetensors", header))
    with pytest.raises(ValueError, match=message) as err:
        mapped.get_tensor(key)
    assert f"tensor {key}" in str(err.value)


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="too short"):
        MappedTensors(short)
    with pytest.raises(ValueError, match="runs past the file"):
        MappedTensors(_with_header(tmp_path / "long.safetensors", {}, length=10**6))
    with pytest.raises(ValueError, match="not a JSON object"):
        MappedTensors(_with_header(tmp_path / "list.safetensors", [1, 2]))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(ValueError, match="not valid JSON"):
        MappedTensors(broken)
