"""The continuous-batching scheduler and the BatchLayout it produces (no model involved)."""

from __future__ import annotations

import pytest

from lorafleet.worker.batch_builder import build_batch
from lorafleet.worker.batching import ScheduledSeq, Scheduler
from lorafleet.worker.block_allocator import KVBlockAllocator
from lorafleet.worker.sequence import SeqStatus, Sequence
from lorafleet.worker.types import Request


class FakeSlots:
    """Adapter name -> slot, with a fixed number of slots and pin counts."""

    def __init__(self, n: int) -> None:
        self.n, self.slot, self.pins = n, {}, {}

    def can_acquire(self, name):
        return (
            name is None
            or name in self.slot
            or len(self.slot) < self.n
            or any(self.pins.get(a, 0) == 0 for a in self.slot)
        )

    def acquire(self, name):
        if name is None:
            return -1
        if name not in self.slot:
            if len(self.slot) >= self.n:
                victim = next(a for a in self.slot if self.pins.get(a, 0) == 0)
                self.slot[name] = self.slot.pop(victim)
            else:
                self.slot[name] = len(self.slot)
        self.pins[name] = self.pins.get(name, 0) + 1
        return self.slot[name]

    def release(self, name):
        if name is not None:
            self.pins[name] -= 1


def seq(i: int, n_prompt: int, adapter: str | None = None) -> Sequence:
    return Sequence(Request(f"s{i}", tuple(range(10, 10 + n_prompt)), adapter), i)


def make(blocks: int = 64, block_size: int = 4, slots: int = 4, batch: int = 8, tokens: int = 64):
    alloc = KVBlockAllocator(blocks, block_size)
    return Scheduler(alloc, FakeSlots(slots), max_batch_size=batch, max_num_batched_tokens=tokens), alloc


def test_layout_groups_rows_by_sequence_and_adapter() -> None:
    sched, _ = make()
    seqs = [seq(0, 5, "b"), seq(1, 3, None), seq(2, 6, "a"), seq(3, 2, "b")]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    batch = build_batch(out.scheduled, 4, "cpu")
    slot = {s.request_id: s.lora_slot for s in seqs}
    assert [slot[r] for r in batch.seq_ids] == sorted(slot[r] for r in batch.seq_ids)
    assert batch.seq_ids == ("s1", "s0", "s3", "s2")  # base first, then by slot, FCFS within a slot
    assert batch.query_start_loc.tolist() == [0, 3, 8, 10, 16]
    assert batch.lora_seg_indptr.tolist() == [0, 3, 10, 16]
    assert batch.lora_seg_slots.tolist() == [-1, slot["s0"], slot["s2"]]
    assert batch.logits_indices.tolist() == [2, 7, 9, 15] and batch.sample_seq_ids == batch.seq_ids
    s0 = seqs[0]
    assert batch.positions[3:8].tolist() == list(range(5))
    assert batch.input_ids[3:8].tolist() == list(s0.request.prompt_token_ids)
    assert batch.slot_mapping[3:8].tolist() == [s0.block_table[p // 4] * 4 + p % 4 for p in range(5)]
    assert batch.block_tables[1, :2].tolist() == s0.block_table
    assert batch.seq_lens.tolist() == [3, 5, 2, 6] and batch.max_query_len == 6


def test_chunked_prefill_under_token_budget_then_decode() -> None:
    sched, _ = make(tokens=4)
    a, b = seq(0, 6), seq(1, 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a takes the whole budget: 4 of its 6 prompt tokens
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("s0", 4)]
    batch = build_batch(out.scheduled, 4, "cpu")
    assert batch.logits_indices.tolist() == []  # the prompt is not complete: nothing to sample
    a.num_computed_tokens += 4
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("s0", 2), ("s1", 2)]
    batch = build_batch(out.scheduled, 4, "cpu")
    assert batch.sample_seq_ids == ("s0",) and batch.positions.tolist() == [4, 5, 0, 1]


def test_preempts_newest_when_blocks_run_out_and_recomputes() -> None:
    sched, alloc = make(blocks=4, block_size=2, tokens=64)
    old, new = seq(0, 4), seq(1, 4)
    sched.add(old)
    sched.add(new)
    out = sched.schedule()
    assert len(out.scheduled) == 2 and alloc.num_free == 0
    for s in (old, new):
        s.num_computed_tokens = 4
        s.output_token_ids.append(7)  # each sampled a token: the next step needs a third block
    out = sched.schedule()
    assert out.preempted == [new] and new.status is SeqStatus.WAITING and new.num_computed_tokens == 0
    assert [s.seq for s in out.scheduled] == [old] and sched.num_preemptions == 1
    sched.remove(old)
    out = sched.schedule()
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(new, 5)]  # prompt + output recomputed


def test_admission_respects_batch_size_and_adapter_slots_fcfs() -> None:
    sched, _ = make(slots=1, batch=2)
    xs = [seq(0, 2, "x"), seq(1, 2, "y"), seq(2, 2, "x")]
    for s in xs:
        sched.add(s)
    out = sched.schedule()
    # "y" cannot get the only slot while "x" runs; FCFS keeps the later "x" request behind it.
    assert [s.seq.request_id for s in out.scheduled] == ["s0"]
    sched.remove(xs[0])
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["s1"]


def test_builder_rejects_inconsistent_schedules() -> None:
    s = seq(0, 4)
    with pytest.raises(ValueError, match="no scheduled"):
        build_batch([], 4, "cpu")
    with pytest.raises(ValueError, match="KV blocks"):
        build_batch([ScheduledSeq(s, 4)], 4, "cpu")


def test_adapters_of_waiting_sequences_are_asked_for_ahead_of_admission() -> None:
    """``can_acquire`` starts a background load: the next waiting sequences' adapters are asked for
    while the head waits for its own, so loads do not run one at a time as each request reaches
    the head. Only as many as could join the batch are asked for."""

    class Loading(FakeSlots):
        def __init__(self) -> None:
            super().__init__(8)
            self.asked: list[str | None] = []

        def can_acquire(self, name):
            self.asked.append(name)
            return name != "slow" and super().can_acquire(name)

    slots = Loading()
    sched = Scheduler(KVBlockAllocator(64, 4), slots, max_batch_size=3, max_num_batched_tokens=64)
    for i, adapter in enumerate(["a", "slow", "b", "c", "d"]):
        sched.add(seq(i, 3, adapter))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["s0"]  # FCFS: "slow" blocks the rest
    # The head ("slow") and the sequences behind it that fit in the batch (3 - 1 running = 2).
    assert slots.asked[-2:] == ["slow", "b"] and "c" not in slots.asked
