"""read_packed: the file read straight into the slot layout gives the bytes of load_adapter + pack,
refuses what they refuse, and survives short reads, unaligned files and corrupt headers."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafleet.worker.adapter_reader as reader_module
from lorafleet.worker.adapter_reader import read_packed
from lorafleet.worker.adapters import AdapterFormatError, load_adapter
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.lora_pool import PROJECTIONS, LoraSlotPool
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.safetensors_header import HeaderError, read_header

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    # Ranks 4/8/16, rsLoRA, a per-module rank pattern, adapters that skip projections.
    return make_demo(tmp_path_factory.mktemp("reader") / "demo", num_adapters=6, seed=2)


@pytest.fixture(scope="module")
def config(demo) -> ModelConfig:
    return ModelConfig.from_dir(demo.model_dir)


def make_pool(config: ModelConfig, dtype: torch.dtype, targets=PROJECTIONS, r_max: int = 16) -> LoraSlotPool:
    return LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), 1, r_max, dtype, "cpu", targets)


def copy_as(src: Path, dst: Path, dtype: torch.dtype, edit=None) -> Path:
    """The adapter at ``src`` with its tensors stored in ``dtype`` (``edit(tensors)`` may change them)."""
    shutil.copytree(src, dst)
    tensors = {k: v.to(dtype) for k, v in load_file(str(dst / WEIGHTS)).items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def reference(path: Path, config: ModelConfig, pool: LoraSlotPool) -> torch.Tensor:
    return pool.pack(load_adapter(path, config, dtype=pool.dtype)).buffer


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_same_bytes_as_load_and_pack(demo, config, tmp_path, pool_dtype, file_dtype) -> None:
    pool = make_pool(config, pool_dtype)
    subset = make_pool(config, pool_dtype, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    refused = 0
    for name, src in demo.adapters.items():
        path = copy_as(src, tmp_path / name, file_dtype)
        packed = read_packed(path, config, pool, name=name)
        assert torch.equal(packed.buffer, reference(path, config, pool)), name
        assert packed.name == name and packed.source == str(path)
        assert set(packed.stages) == {"parse", "alloc", "layout", "read", "convert", "finite"}
        assert packed.read_seconds > 0 and packed.pack_seconds > 0
        # A pool without some projection refuses the adapters that adapt it, as pack does.
        try:
            expect = reference(path, config, subset)
        except ValueError as e:
            refused += 1
            with pytest.raises(ValueError) as got:
                read_packed(path, config, subset, name=name)
            assert str(got.value) == str(e)
            continue
        assert torch.equal(read_packed(path, config, subset, name=name).buffer, expect)
    assert 0 < refused < len(demo.adapters)


def test_a_reused_buffer_gets_every_padding_byte_rewritten(demo, config, monkeypatch) -> None:
    # Pinned buffers come back from torch's cache holding an earlier adapter; here every new buffer
    # is full of 0xFF, so a padding byte the reader does not write shows up as a difference.
    pool, clean = make_pool(config, torch.float32), make_pool(config, torch.float32)

    def dirty(*, pin: bool = False) -> torch.Tensor:
        return torch.full((pool.packed_nbytes,), 0xFF, dtype=torch.uint8)

    monkeypatch.setattr(pool, "new_buffer", dirty)
    for name, path in demo.adapters.items():
        assert torch.equal(read_packed(path, config, pool).buffer, reference(path, config, clean)), name


def test_small_chunks_and_scatter_batches(demo, config, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reader_module, "CHUNK_BYTES", 1000)  # smaller than one tensor: one per chunk
    monkeypatch.setattr(reader_module, "_IOV_MAX", 3)
    monkeypatch.setattr(reader_module, "_scratch", type(reader_module._scratch)())
    pool = make_pool(config, torch.bfloat16)
    for name, src in demo.adapters.items():
        for dtype in (torch.float32, torch.bfloat16):
            path = copy_as(src, tmp_path / f"{name}-{str(dtype)[6:]}", dtype)
            assert torch.equal(read_packed(path, config, pool).buffer, reference(path, config, pool))


def test_short_reads_are_resumed_and_a_truncated_file_is_refused(demo, config, monkeypatch) -> None:
    real = os.preadv
    pool = make_pool(config, torch.float32)
    path = demo.adapters["adapter-1"]

    def trickle(fd, views, offset):  # the kernel may fill fewer bytes than asked
        budget, trimmed = 777, []
        for v in views:
            trimmed.append(v[: min(len(v), budget)])
            budget -= len(trimmed[-1])
            if budget == 0:
                break
        return real(fd, trimmed, offset)

    monkeypatch.setattr(reader_module.os, "preadv", trickle)
    assert torch.equal(read_packed(path, config, pool).buffer, reference(path, config, pool))
    monkeypatch.setattr(reader_module.os, "preadv", lambda fd, views, offset: 0)
    with pytest.raises(AdapterFormatError, match=r"cannot be read .*ended before its last tensor"):
        read_packed(path, config, pool)
    monkeypatch.delattr(reader_module.os, "preadv")  # platforms without it: one pread per buffer
    assert torch.equal(read_packed(path, config, pool).buffer, reference(path, config, pool))


def write_raw(path: Path, header: dict | str, data: bytes, pad_to: int = 1) -> None:
    """A safetensors file written by hand: ``pad_to=1`` leaves the data section unaligned."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-(8 + len(raw)) % pad_to)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_an_unaligned_data_section_reads_the_same(demo, config, tmp_path) -> None:
    src = demo.adapters["adapter-5"]  # rank pattern: mixed ranks, strided B regions
    tensors = load_file(str(src / WEIGHTS))
    for pad_to in (1, 2):
        header: dict = {}
        data = b""
        for key, t in sorted(tensors.items()):
            header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [len(data)]}
            data += t.numpy().tobytes()
            header[key]["data_offsets"].append(len(data))
        # Metadata of a chosen length puts the float32 data off a 4-byte boundary.
        for n in range(8):
            header["__metadata__"] = {"pad": "x" * n}
            raw_len = len(json.dumps(header).encode())
            if (8 + raw_len + (-(8 + raw_len) % pad_to)) % 4:
                break
        path = shutil.copytree(src, tmp_path / f"pad{pad_to}")
        write_raw(path / WEIGHTS, header, data, pad_to)
        fd = os.open(path / WEIGHTS, os.O_RDONLY)
        try:
            assert min(e.start for e in read_header(fd).values()) % 4, "the data should be misaligned"
        finally:
            os.close(fd)
        for dtype in (torch.float32, torch.bfloat16):
            pool = make_pool(config, dtype)
            assert torch.equal(read_packed(path, config, pool).buffer, reference(src, config, pool))


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # read in place if same dtype
B_KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"  # rank 4 < r_max: strided


@pytest.mark.parametrize(
    ("pool_dtype", "key", "value", "file_dtype", "match"),
    [
        (torch.float32, B_KEY, float("nan"), torch.float32, "layer 1 down_proj lora_B"),
        (torch.bfloat16, A_KEY, float("nan"), torch.bfloat16, "layer 0 q_proj lora_A"),
        (torch.bfloat16, B_KEY, float("-inf"), torch.bfloat16, "layer 1 down_proj lora_B"),
        # Finite in float32, Inf once rounded to bfloat16 (a float32 pool holds it).
        (torch.bfloat16, A_KEY, 3.4e38, torch.float32, "layer 0 q_proj lora_A"),
        (torch.float16, B_KEY, 1e5, torch.float32, "layer 1 down_proj lora_B"),  # beyond float16
    ],
)
def test_non_finite_weights_are_named(
    demo, config, tmp_path, pool_dtype, key, value, file_dtype, match
) -> None:
    def poison(tensors):
        tensors[key][-1, -1] = value

    path = copy_as(demo.adapters["adapter-5"], tmp_path / "bad", file_dtype, poison)
    with pytest.raises(AdapterFormatError, match=f"{match} holds NaN or Inf values"):
        read_packed(path, config, make_pool(config, pool_dtype))
    if value == 3.4e38:
        read_packed(path, config, make_pool(config, torch.float32))


def test_non_float_tensors_are_refused_like_load_adapter(demo, config, tmp_path) -> None:
    def to_int(tensors):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = tensors[key].to(torch.int32)

    path = copy_as(demo.adapters["adapter-0"], tmp_path / "int", torch.float32, to_int)
    match = "layer 0 q_proj lora_A has non-float dtype torch.int32"
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(path, config)
    with pytest.raises(AdapterFormatError, match=match):
        read_packed(path, config, make_pool(config, torch.float32))


GOOD = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, 16, "not what shape and dtype"),
        ({"t": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, 16, "unsupported dtype 'C64'"),
        ({"t": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "shape must be"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, 16, "inside the data section"),
        ({"t": {"dtype": "F32", "shape": [4]}}, 16, "exactly dtype, shape and data_offsets"),
        (GOOD, 20, "cover 16 of the 20 data bytes"),
        (
            {**GOOD, "u": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}},
            24,
            "'u': data_offsets leave a gap",
        ),
        (
            {**GOOD, "u": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            16,
            "leave a gap or overlap",
        ),
        ({**GOOD, "__metadata__": {"a": 1}}, 16, "__metadata__ must map names to strings"),
        ([1, 2], 0, "not a JSON object"),
        # A name given twice: JSON keeps the last entry, and the first one's bytes are left over.
        (
            '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            '"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            16,
            "'t': data_offsets leave a gap",
        ),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, data, match) -> None:
    path = tmp_path / "f.safetensors"
    write_raw(path, header, b"\0" * data, pad_to=8)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(HeaderError, match=match):
            read_header(fd)
    finally:
        os.close(fd)


def test_raw_file_damage_is_refused_with_the_reason(demo, config, tmp_path) -> None:
    pool = make_pool(config, torch.float32)
    path = shutil.copytree(demo.adapters["adapter-0"], tmp_path / "a")
    good = (path / WEIGHTS).read_bytes()
    (header_len,) = struct.unpack("<Q", good[:8])
    cases = [
        (good[:5], "too short for a header"),
        (struct.pack("<Q", 1 << 40) + good[8:], "exceeds"),
        (good[: 8 + header_len - 3], "runs past the end"),
        (good[:8] + b"{" + b"\xff" * (header_len - 1) + good[8 + header_len :], "not valid JSON"),
        (good[:-4], "inside the data section"),
    ]
    for raw, match in cases:
        (path / WEIGHTS).write_bytes(raw)
        with pytest.raises(AdapterFormatError, match=f"{WEIGHTS} cannot be read .*{match}"):
            read_packed(path, config, pool)
    # The same file is fine again: nothing about the reader is left in a bad state.
    (path / WEIGHTS).write_bytes(good)
    assert torch.equal(read_packed(path, config, pool).buffer, reference(path, config, pool))
