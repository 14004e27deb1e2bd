"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step the running sequences go first, oldest first: a decode costs one token of the
``max_num_batched_tokens`` budget, an unfinished prompt gets a chunk of whatever budget is left
(chunked prefill). Then waiting sequences are admitted strictly first-come-first-served while the
batch, the budget, the KV blocks and the LoRA slots allow. When a running sequence needs a KV block
and none is free, the newest running sequence is preempted: its blocks and slot pin are released
and it goes back to the queue to be recomputed later. Torch-free: it moves integers only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from lorafleet.worker.block_allocator import KVBlockAllocator
from lorafleet.worker.sequence import SeqStatus, Sequence


class SlotProvider(Protocol):
    def can_acquire(self, name: str | None) -> bool: ...
    def acquire(self, name: str | None) -> int: ...
    def release(self, name: str | None) -> None: ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # rows this sequence contributes, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        allocator: KVBlockAllocator,
        slots: SlotProvider,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
    ) -> None:
        self.allocator = allocator
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len if max_model_len is not None else 1 << 62
        self.waiting: list[Sequence] = []  # sorted by arrival_index (oldest first)
        self.running: list[Sequence] = []  # sorted by arrival_index (oldest first)
        self.num_preemptions = 0
        self._failed: list[tuple[Sequence, str]] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival_index)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0 or seq.is_length_capped(self.max_model_len):
                continue
            need = self.allocator.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table)
            while need > self.allocator.num_free:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            seq.block_table.extend(self.allocator.allocate(max(need, 0)))
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        if not out.preempted:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.slots.can_acquire(seq.adapter):
                break  # FCFS: later requests wait too, so this one cannot starve
            n = min(seq.num_uncomputed_tokens, budget)
            need = self.allocator.blocks_needed(n)
            if need > self.allocator.num_free:
                break
            self.waiting.pop(0)
            try:
                seq.lora_slot = self.slots.acquire(seq.adapter)
            except Exception as exc:  # e.g. the adapter's files vanished since registration
                self._failed.append((seq, f"loading adapter {seq.adapter!r} failed: {exc}"))
                continue
            seq.holds_adapter_pin = True
            seq.block_table = self.allocator.allocate(need)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_index)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self._prefetch()
        return budget

    def _prefetch(self) -> None:
        """Ask about the adapters of the waiting sequences that could join the batch next.

        ``can_acquire`` starts a background load of an adapter that is not in host memory, so the
        loads run ahead of admission instead of one at a time as each request reaches the head.
        """
        room = self.max_batch_size - len(self.running)
        for seq in self.waiting[:room]:
            self.slots.can_acquire(seq.adapter)

    def take_failed(self) -> list[tuple[Sequence, str]]:
        """Sequences that could not be admitted (with why), since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.reset_for_recompute()
        self.add(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the scheduler (finished, aborted or exported), freeing what it holds."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
            seq.block_table = []
        if seq.holds_adapter_pin:
            self.slots.release(seq.adapter)
            seq.holds_adapter_pin = False
