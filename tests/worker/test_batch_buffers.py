"""Packed step metadata (one host-to-device copy) and the CUDA-graph batch buckets, on the CPU."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lorafleet.worker import Engine, SamplingParams
from lorafleet.worker.batch_buffers import BatchBuffers, PackedShape, decode_shape, mixed_shape
from lorafleet.worker.batch_builder import BatchPlan, build_batch, plan_batch
from lorafleet.worker.batching import Scheduler
from lorafleet.worker.block_allocator import KVBlockAllocator
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.model_runner import graph_batch_sizes, graph_token_sizes
from lorafleet.worker.sequence import Sequence
from lorafleet.worker.types import Request

FIELDS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "block_tables",
    "lora_seg_indptr",
    "lora_seg_slots",
    "logits_indices",
)


class Slots:
    """Each adapter name gets the next slot, forever (enough for these tests)."""

    def __init__(self) -> None:
        self.slot: dict[str, int] = {}

    def can_acquire(self, name: str | None) -> bool:
        return True

    def acquire(self, name: str | None) -> int:
        return -1 if name is None else self.slot.setdefault(name, len(self.slot))

    def release(self, name: str | None) -> None:
        pass


def scheduled_mixed():
    sched = Scheduler(KVBlockAllocator(64, 4), Slots(), max_batch_size=8, max_num_batched_tokens=64)
    for i, (n, adapter) in enumerate([(5, "b"), (3, None), (6, "a"), (2, "b")]):
        sched.add(Sequence(Request(f"s{i}", tuple(range(10, 10 + n)), adapter), i))
    return sched, sched.schedule().scheduled


def buffers(width: int = 8) -> BatchBuffers:
    return BatchBuffers(PackedShape(rows=64, seqs=8, segs=9, logits=8, width=width), torch.device("cpu"))


def test_packed_upload_equals_field_by_field_build() -> None:
    _, scheduled = scheduled_mixed()
    want = build_batch(scheduled, 4, "cpu")
    got = buffers().upload(plan_batch(scheduled, 4))
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.int32, name
        assert torch.equal(a.long(), b.long()), name
    for name in (
        "seq_ids",
        "query_lens",
        "context_lens",
        "max_query_len",
        "max_context_len",
        "sample_seq_ids",
    ):
        assert getattr(got, name) == getattr(want, name), name


def decode_plan():
    sched, scheduled = scheduled_mixed()
    for item in scheduled:  # the prompts are cached and one token was sampled for each
        item.seq.num_computed_tokens += item.num_tokens
        item.seq.output_token_ids.append(7)
    return plan_batch(sched.schedule().scheduled, 4)


def test_decode_padded_to_a_bucket_reads_and_writes_nothing_in_the_padding() -> None:
    plan = decode_plan()
    assert plan.is_decode_only and plan.num_seqs == 4
    bufs = buffers()
    got = bufs.upload(plan, pad_to=8, width=8)
    n = plan.num_seqs
    assert got.input_ids.tolist() == plan.input_ids + [0] * 4
    assert got.positions.tolist() == plan.positions + [0] * 4
    assert got.slot_mapping.tolist() == plan.slot_mapping + [-1] * 4
    assert got.seq_lens.tolist() == list(plan.context_lens) + [0] * 4
    assert got.query_start_loc.tolist() == list(range(9))
    assert got.block_tables.shape == (8, 8)
    for i, table in enumerate(plan.block_tables):
        assert got.block_tables[i].tolist() == table + [-1] * (8 - len(table))
    assert (got.block_tables[n:] == -1).all()
    # The real segments, one segment of slot -1 over the padding rows, then empty ones.
    segs = len(plan.seg_slots)
    indptr, slots = got.lora_seg_indptr.tolist(), got.lora_seg_slots.tolist()
    assert len(indptr) == 10 and len(slots) == 9
    assert indptr[: segs + 1] == plan.seg_indptr and indptr[segs + 1 :] == [8] * (9 - segs)
    assert slots[:segs] == plan.seg_slots and slots[segs:] == [-1] * (9 - segs)
    assert got.logits_indices.tolist() == list(range(8))


def test_a_mixed_step_pads_to_a_row_bucket_and_the_full_sequence_capacity() -> None:
    """A step with prefill rows, padded as its graph reads it: the real rows and sequences first,
    then padding rows (no KV slot, no adapter) in no sequence, and empty padding sequences."""
    _, scheduled = scheduled_mixed()
    plan = plan_batch(scheduled, 4)
    n, b = plan.num_tokens, plan.num_seqs
    assert not plan.is_decode_only and n == 16 and b == 4
    bufs = BatchBuffers(PackedShape(rows=64, seqs=8, segs=9, logits=8, width=8), torch.device("cpu"))
    got = bufs.upload(plan, pad_rows=20)
    assert got.input_ids.shape == (20,)
    assert got.input_ids.tolist() == plan.input_ids + [0] * 4
    assert got.slot_mapping.tolist() == plan.slot_mapping + [-1] * 4
    assert got.positions.tolist() == plan.positions + [0] * 4
    assert got.query_start_loc.tolist() == list(plan.query_start) + [16] * 4
    assert got.seq_lens.tolist() == list(plan.context_lens) + [0] * 4
    assert (got.block_tables[b:] == -1).all() and got.block_tables.shape == (8, 8)
    segs = len(plan.seg_slots)
    indptr, slots = got.lora_seg_indptr.tolist(), got.lora_seg_slots.tolist()
    assert indptr[: segs + 1] == plan.seg_indptr and indptr[segs + 1 :] == [20] * (9 - segs)
    assert slots[segs:] == [-1] * (9 - segs)
    # Sampled rows in sample order, padded with row 0 (its logits are computed and ignored).
    k = len(plan.logits_indices)
    assert got.logits_indices.tolist() == plan.logits_indices + [0] * (8 - k)
    # Every step of a bucket lands on the addresses its graph was captured over.
    placeholder = bufs.layout(mixed_shape(20, bufs.capacity))
    for name in FIELDS:
        assert getattr(got, name).data_ptr() == getattr(placeholder, name).data_ptr(), name
    with pytest.raises(ValueError, match="does not pad to 8 rows"):
        bufs.upload(plan, pad_rows=8)


def test_graph_token_sizes() -> None:
    assert graph_token_sizes(2048, 2048) == (32, 64, 128, *range(256, 2049, 128))
    assert graph_token_sizes(8192, 1000)[-3:] == (768, 896, 1000)
    assert graph_token_sizes(100, 2048) == (32, 64, 100)
    assert graph_token_sizes(2048, 0) == ()
    assert graph_token_sizes(2048, 20) == (20,)


def test_same_padded_shape_gives_the_same_views() -> None:
    """A captured graph reads fixed addresses: every step of a bucket must land on them."""
    plan = decode_plan()
    bufs = buffers()
    first = bufs.upload(plan, pad_to=8, width=8)
    second = bufs.upload(plan, pad_to=8, width=8)
    placeholder = bufs.layout(decode_shape(8, 8))
    for name in FIELDS:
        ptrs = {getattr(b, name).data_ptr() for b in (first, second, placeholder)}
        assert len(ptrs) == 1, name


def test_padding_refuses_prefill_and_oversized_batches() -> None:
    _, scheduled = scheduled_mixed()
    with pytest.raises(ValueError, match="only a decode batch"):
        buffers().upload(plan_batch(scheduled, 4), pad_to=8, width=8)
    with pytest.raises(ValueError, match="only a decode batch"):
        buffers().upload(decode_plan(), pad_to=2, width=8)
    with pytest.raises(ValueError, match="exceeds the buffers' capacity"):
        buffers(width=1).upload(plan_batch(scheduled, 4))


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert graph_batch_sizes(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert graph_batch_sizes(256)[-5:] == (128, 160, 192, 224, 256)
    assert graph_batch_sizes(100)[-3:] == (64, 96, 100)


def test_an_empty_plan_pads_to_all_padding_rows() -> None:
    """Graph capture uploads a plan with no sequence: every row is padding."""
    empty = BatchPlan.empty()
    got = buffers().upload(empty, pad_to=4, width=8)
    assert got.slot_mapping.tolist() == [-1] * 4 and got.seq_lens.tolist() == [0] * 4
    assert got.lora_seg_indptr.tolist() == [0, 4, 4, 4, 4, 4] and got.lora_seg_slots.tolist() == [-1] * 5
    assert got.is_decode_only


interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="Triton interpreter runs only on CPU-only hosts",
)


def triton_engine(tmp_path) -> Engine:
    """The demo model with two adapters, its attention on the Triton kernels (the CUDA path)."""
    demo = make_demo(tmp_path, num_adapters=2, seed=3)
    engine = Engine.from_pretrained(demo.model_dir, max_batch_size=8, max_loras=2)
    engine.model.set_attention_backend("triton")
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    return engine


@interpreter_only
def test_padded_decode_layout_gives_the_same_logits(tmp_path) -> None:
    """What a graph replay computes (the bucket-padded layout, CUDA's kernels) equals the compact step."""
    engine = triton_engine(tmp_path)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    for i, adapter in enumerate(["adapter-0", None, "adapter-1"]):
        engine.add_request(Request(f"r{i}", tuple(range(5, 12 + 3 * i)), adapter, sp))
    engine.step()  # the prompts
    plan = plan_batch(engine.scheduler.schedule().scheduled, engine.config.block_size)
    assert plan.is_decode_only and plan.uses_lora
    model, kv, pool = engine.model, engine.kv, engine.lora_pool
    want = model.forward_all_logits(engine.runner.buffers.upload(plan), kv, pool)
    padded = engine.runner.buffers.upload(plan, pad_to=8, width=engine.runner.width)
    got = model.forward_all_logits(padded, kv, pool)
    assert got.shape[0] == 8
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_padded_mixed_layout_gives_the_same_logits_and_cache(tmp_path) -> None:
    """What a mixed-step graph replay computes (prefill chunks and decodes padded to a row bucket and
    the full sequence capacity, the prefill attention kernel launched for the bucket's widest query)
    equals the compact step: the same sampled logits, the same KV written."""
    engine = triton_engine(tmp_path)
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request(Request("old", tuple(range(5, 14)), "adapter-1", sp))
    engine.step()  # its prompt: next step it decodes beside the new prompts
    for i, adapter in enumerate(["adapter-0", None]):
        engine.add_request(Request(f"r{i}", tuple(range(5, 12 + 3 * i)), adapter, sp))
    plan = plan_batch(engine.scheduler.schedule().scheduled, engine.config.block_size)
    assert not plan.is_decode_only and plan.uses_lora and plan.num_seqs == 3
    model, kv, pool, bufs = engine.model, engine.kv, engine.lora_pool, engine.runner.buffers
    before = [t.clone() for t in kv.k + kv.v]
    want = model(bufs.upload(plan), kv, pool)
    want_cache = [t.clone() for t in kv.k + kv.v]
    for t, saved in zip(kv.k + kv.v, before):
        t.copy_(saved)
    rows = 32
    padded = dataclasses.replace(bufs.upload(plan, pad_rows=rows), max_query_len=rows)
    got = model(padded, kv, pool)
    assert got.shape[0] == bufs.capacity.logits
    torch.testing.assert_close(got[: len(plan.logits_indices)], want, rtol=1e-5, atol=1e-5)
    for t, w in zip(kv.k + kv.v, want_cache):
        torch.testing.assert_close(t, w, rtol=0, atol=0)
