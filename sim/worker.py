"""SimWorker: one simulated engine, following worker/batching.py's rules on integers only.

Each step, like the real `Scheduler.schedule`: running sequences first, oldest first (a decode costs
one token of `max_num_batched_tokens`, an unfinished prompt a chunk of what is left: chunked
prefill); a running sequence short of a KV block preempts the newest running one; with no
preemption, waiting sequences are admitted strictly FCFS while the batch, the budget, the KV blocks
and the adapter slots allow. An adapter not in a GPU slot is loaded on admission (host-cache hit or
disk read), and its load time is added to that step.

Why not reuse `worker.batching.Scheduler` itself: it works on `Sequence` objects that carry token id
lists and a `Request`, which a million simulated requests cannot afford; the rules are copied here
and a test runs both on the same inputs and checks they make the same choices.

Fast-forward: when a step is decode-only and the next one would be too (nothing admissible, no
preemption), the worker plans a phase of k identical-shape decode steps up to the next finish or
block shortage; its duration sums in closed form because the profile is linear in context. A
command arriving mid-phase (add, export) takes effect at the end of the step in progress, as the
real actor runs commands between steps.
"""

from __future__ import annotations

import math
from bisect import insort
from collections import OrderedDict

from lorafleet.scheduler.policy_types import (
    RunningSeq,
    WorkerSnapshot,
    WorkerState,
    blocks_for,
    placeable_free_blocks,
)
from lorafleet.sim.profile import LatencyProfile
from lorafleet.sim.sequences import SimSeq


class Phase:
    """`steps` consecutive steps from `start`; for a multi-step decode phase, the closed-form terms."""

    __slots__ = ("ctx0", "decode", "end", "per_step", "scale", "scheduled", "start", "steps")

    def __init__(self, start: float, scheduled: list[tuple[SimSeq, int]], per_step: float) -> None:
        self.start = start
        self.end = start + per_step  # kept current by the worker (plan, cut)
        self.scheduled = scheduled
        self.steps = 1
        self.per_step = per_step  # first step's seconds (incl. adapter loads)
        self.decode = 0  # sequences of a decode phase; its context grows by this per step
        self.ctx0 = 0
        self.scale = 1.0  # a decode phase's slowdown (single steps have it in per_step)


class SimWorker:
    def __init__(
        self,
        worker_id: str,
        order: int,
        profile: LatencyProfile,
        requested_at: float,
        *,
        changed: list[SimWorker] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.order = order
        self.profile = profile
        self.shape = profile.engine
        self.state = WorkerState.STARTING
        self.requested_at = requested_at
        self.stopped_at: float | None = None
        self.running: list[SimSeq] = []  # oldest first
        self.waiting: list[SimSeq] = []  # oldest first
        self.owned: dict[str, SimSeq] = {}  # everything the scheduler gave it (running, waiting, inbox)
        self.free_blocks = self.shape.num_kv_blocks
        self.resident: OrderedDict[str, int] = OrderedDict()  # GPU slots: adapter -> pins, LRU first
        self._resident_set: frozenset[str] | None = frozenset()  # its keys; None when stale
        self.pinned = 0  # resident adapters with pins > 0
        self.host: OrderedDict[str, None] = OrderedDict()  # host LRU
        self.phase: Phase | None = None
        self.slowdown = 1.0  # set by the simulator when workers share CPU cores
        self.busy = False  # the simulator's record of whether it owns sequences
        self.version = 0  # bumped on every change the policies could see
        # The simulator's list of workers changed since its last placement pass (each listed once,
        # while `listed`): a pass then refreshes those instead of checking the whole fleet.
        self.changed = changed
        self.listed = False
        self.inbox_exports: list[SimSeq] = []
        self.idle_since: float | None = None
        # When it last computed (or was asked for): how long it has slept when new work comes.
        self.last_step_end = requested_at
        self.busy_s = 0.0
        self.preemptions = 0
        self.adapter_loads = 0  # GPU slot fills, from the host cache or from disk
        self.adapter_disk_loads = 0
        self._next_index = 0
        self._snap: WorkerSnapshot | None = None
        self._snap_version = -1

    # ------------------------------------------------------------ commands (from the simulator)

    def add(self, seq: SimSeq) -> None:
        seq.index = self._next_index
        self._next_index += 1
        self.owned[seq.record.rid] = seq
        self.waiting.append(seq)  # indices grow, so appending keeps it sorted
        self.idle_since = None
        self.touch()

    def request_export(self, seq: SimSeq) -> None:
        seq.exporting = True
        self.inbox_exports.append(seq)
        self.touch()

    def take_exports(self) -> list[SimSeq]:
        """Remove the sequences asked for (still owned) at a step boundary, freeing what they hold."""
        out = []
        for seq in self.inbox_exports:
            if self.owned.get(seq.record.rid) is not seq:
                continue  # it finished first
            self._release(seq)
            if seq.running:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            del self.owned[seq.record.rid]
            out.append(seq)
        self.inbox_exports = []
        self.touch()
        return out

    def touch(self) -> None:
        self.version += 1
        if not self.listed and self.changed is not None:
            self.listed = True
            self.changed.append(self)

    # ------------------------------------------------------------ adapter slots

    def _can_acquire(self, adapter: str | None) -> bool:
        if adapter is None or adapter in self.resident:
            return True
        return len(self.resident) < self.shape.max_loras or self.pinned < len(self.resident)

    def _acquire(self, adapter: str | None) -> float:
        """Pin the adapter's slot; returns the load seconds it cost (0 when already resident)."""
        if adapter is None:
            return 0.0
        pins = self.resident.get(adapter)
        if pins is not None:
            self.resident.move_to_end(adapter)
            self.resident[adapter] = pins + 1
            if pins == 0:
                self.pinned += 1
            return 0.0
        if len(self.resident) >= self.shape.max_loras:
            victim = next(a for a, p in self.resident.items() if p == 0)  # LRU unpinned
            del self.resident[victim]
        self.resident[adapter] = 1
        self._resident_set = None
        self.pinned += 1
        self.adapter_loads += 1
        if adapter in self.host:
            self.host.move_to_end(adapter)
            return self.profile.adapter_host_load_s
        self.adapter_disk_loads += 1
        if self.shape.host_cache_adapters > 0:
            self.host[adapter] = None
            if len(self.host) > self.shape.host_cache_adapters:
                self.host.popitem(last=False)
        return self.profile.adapter_disk_load_s

    def _release(self, seq: SimSeq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        if seq.running and seq.adapter is not None:
            pins = self.resident[seq.adapter] - 1
            self.resident[seq.adapter] = pins
            if pins == 0:
                self.pinned -= 1

    # ------------------------------------------------------------ stepping

    def plan(self, now: float) -> Phase | None:
        """Schedule the next step (or decode phase) from `now`; None when there is nothing to run."""
        running, waiting = self.running, self.waiting
        if not running and not waiting:
            self.phase = None
            return None
        shape = self.shape
        bs = shape.block_size
        budget = shape.max_num_batched_tokens
        scheduled: list[tuple[SimSeq, int]] = []
        preempted = False
        # The step's shape, counted as sequences are scheduled (a scheduled one is never preempted
        # later in the same pass: victims come from the unscheduled tail).
        decode = prefill = context = 0
        free = self.free_blocks
        queue = running[:]  # victims of preemption are popped off its unscheduled end
        for qi, seq in enumerate(queue):
            if budget <= 0:
                break
            computed = seq.computed
            n = seq.prompt + seq.generated - computed
            if n > budget:
                n = budget
            if n <= 0:
                continue
            need = -(-(computed + n) // bs) - seq.blocks
            if need > free:
                self.free_blocks = free
                while need > self.free_blocks:
                    victim = queue.pop() if len(queue) > qi + 1 else seq
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                free = self.free_blocks
                if not seq.running:
                    break
            seq.blocks += need
            free -= need
            scheduled.append((seq, n))
            budget -= n
            if n == 1 and seq.generated > 0:
                decode += 1
            else:
                prefill += n
            context += computed + n
        self.free_blocks = free
        # Nothing was running: the worker has been idle since its last step, and wakes up first.
        load_s = 0.0 if running else self.profile.wake_s(now - self.last_step_end)
        if not preempted:
            while waiting and budget > 0 and len(running) < shape.max_batch_size:
                seq = waiting[0]
                if not self._can_acquire(seq.adapter):
                    break  # FCFS: later requests wait too
                computed = seq.computed
                n = min(seq.prompt + seq.generated - computed, budget)
                need = -(-n // bs)
                if need > self.free_blocks:
                    break
                waiting.pop(0)
                load_s += self._acquire(seq.adapter)
                seq.running = True
                seq.blocks = need
                self.free_blocks -= need
                insort(running, seq, key=_index)
                scheduled.append((seq, n))
                budget -= n
                if n == 1 and seq.generated > 0:
                    decode += 1
                else:
                    prefill += n
                context += computed + n
        if not scheduled:
            self.touch()
            if preempted:
                # The oldest sequence preempted itself for want of a block: the engine's next step
                # (at once, nothing ran) admits again from the queue.
                return self.plan(now)
            # Everything left is waiting on something only a finish or an export can free.
            self.phase = None
            return None
        if len(scheduled) == len(running):
            distinct = self.pinned  # adapters with a running sequence: every one is in the step
        else:
            adapters = {seq.adapter for seq, _ in scheduled}
            distinct = len(adapters) - (None in adapters)
        profile = self.profile
        per_step = (profile.step_s(decode, prefill, context, distinct) + load_s) * self.slowdown
        self.touch()
        phase = Phase(now, scheduled, per_step)
        if prefill == 0 and load_s == 0.0 and not preempted and len(scheduled) == len(running):
            steps = self._decode_steps(scheduled, budget)
            if steps > 1:
                phase.steps, phase.decode, phase.ctx0 = steps, decode, context
                phase.per_step = profile.step_s(decode, 0, 0, distinct)
                phase.scale = self.slowdown
                phase.end = now + self.duration(phase, steps)
        self.phase = phase
        return phase

    def _decode_steps(self, scheduled: list[tuple[SimSeq, int]], budget: int) -> int:
        """How many identical decode steps can run before anything changes."""
        steps = scheduled[0][0].output - scheduled[0][0].generated
        for seq, _ in scheduled:
            if seq.output - seq.generated < steps:
                steps = seq.output - seq.generated
        if steps <= 1:
            return 1
        if self.waiting and budget > 0 and len(self.running) < self.shape.max_batch_size:
            head = self.waiting[0]
            # Blocked by slots or blocks: both stay blocked while the batch only decodes. Anything
            # else (it fits now) means the next step admits it.
            if self._can_acquire(head.adapter) and blocks_for(head.num_tokens, self.shape.block_size) <= (
                self.free_blocks
            ):
                return 1
        # Blocks: step j needs blocks_for(c + j) per sequence (c = context before the phase).
        bs, free = self.shape.block_size, self.free_blocks
        extra = 0
        for seq, _ in scheduled:
            extra += -(-(seq.computed + steps) // bs) - seq.blocks
        if extra <= free:  # the common case: blocks last until the next finish
            return steps
        base = [(seq.computed, seq.blocks) for seq, _ in scheduled]

        def fits(k: int) -> bool:
            extra = 0
            for c, held in base:
                extra += blocks_for(c + k, bs) - held
            return extra <= free

        lo, hi = 1, steps  # fits(lo) holds (step 1 is already allocated), fits(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def duration(self, phase: Phase, steps: int) -> float:
        if phase.decode == 0:
            return phase.per_step * steps
        pc = self.profile.per_context_token_s
        per = phase.per_step + pc * phase.ctx0
        return phase.scale * (steps * per + pc * phase.decode * steps * (steps - 1) / 2)

    def cut(self, now: float) -> float:
        """A command arrived at `now` during the phase: end it after the step in progress.
        Returns the phase's (possibly earlier) end time."""
        phase = self.phase
        assert phase is not None
        if phase.steps > 1:
            j = self._step_in_progress(phase, now)
            if j < phase.steps:
                phase.steps = j
                phase.end = phase.start + self.duration(phase, j)
        return phase.end

    def _step_in_progress(self, phase: Phase, now: float) -> int:
        """The smallest j whose step ends at or after `now` (the last step if none does)."""
        last = phase.steps
        # duration(j) = scale * (per * j + a * j * (j - 1)): solve for j, then settle the rounding
        # with the exact test (it is monotone in j), which is what a binary search would find.
        pc = self.profile.per_context_token_s
        per = phase.per_step + pc * phase.ctx0 if phase.decode else phase.per_step
        a = pc * phase.decode / 2
        span = (now - phase.start) / phase.scale if phase.scale > 0 else math.inf
        if a > 0:
            b = per - a
            guess = (-b + math.sqrt(b * b + 4 * a * max(span, 0.0))) / (2 * a)
        else:
            guess = span / per if per > 0 else math.inf
        j = min(max(math.ceil(guess) if guess < last else last, 1), last)
        start = phase.start
        while j < last and start + self.duration(phase, j) < now:
            j += 1
        while j > 1 and start + self.duration(phase, j - 1) >= now:
            j -= 1
        return j

    def end_phase(self, end: float) -> list[SimSeq]:
        """Apply the phase's steps at `end`; returns the sequences that finished."""
        phase = self.phase
        assert phase is not None
        self.phase = None
        self.busy_s += end - phase.start
        self.last_step_end = end
        k = phase.steps
        bs = self.shape.block_size
        delivered_at = end + self.profile.request_overhead_s
        finished: list[SimSeq] = []
        for seq, n in phase.scheduled:
            if not seq.running:
                continue  # preempted later in the same planning pass
            if k > 1:
                computed = seq.computed = seq.computed + k
                seq.generated += k
                blocks = -(-computed // bs)
                self.free_blocks -= blocks - seq.blocks
                seq.blocks = blocks
            else:
                computed = seq.computed = seq.computed + n
                if computed < seq.prompt + seq.generated:
                    continue  # a prefill chunk: no token yet
                seq.generated += 1
            if seq.first_pending:
                seq.first_pending = False
                seq.record.first_token = delivered_at
            if seq.generated >= seq.output:
                rec = seq.record
                rec.finish = delivered_at
                rec.worker = self.worker_id
                finished.append(seq)
        owned, running = self.owned, self.running
        for seq in finished:
            self._release(seq)
            running.remove(seq)
            del owned[seq.record.rid]
        if not owned:
            self.idle_since = end
        self.touch()
        return finished

    def _preempt(self, seq: SimSeq) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.running = False
        seq.computed = 0
        insort(self.waiting, seq, key=_index)
        seq.record.preemptions += 1
        self.preemptions += 1

    # ------------------------------------------------------------ what the policies see

    def resident_adapters(self) -> frozenset[str]:
        if self._resident_set is None:
            self._resident_set = frozenset(self.resident)
        return self._resident_set

    def _pending_tokens(self) -> list[int]:
        # Sequences it holds no KV for: the waiting ones (owned = running + waiting).
        return [s.num_tokens for s in self.waiting]

    def placement_load(self) -> tuple[int, int, frozenset[str]]:
        """The snapshot's batch, free blocks and resident adapters, without building one: all a
        kept placement index needs of an active worker whose snapshot changed."""
        free = placeable_free_blocks(self.free_blocks, self._pending_tokens(), self.shape.block_size)
        return len(self.owned), free, self.resident_adapters()

    def snapshot(self) -> WorkerSnapshot:
        if self._snap_version == self.version and self._snap is not None and self._snap.state is self.state:
            return self._snap
        shape = self.shape
        running = tuple(
            RunningSeq(
                rid,
                s.adapter,
                s.num_tokens,
                s.placed_at,
                s.output - s.generated,
            )
            for rid, s in self.owned.items()
        )
        snap = WorkerSnapshot.from_load(
            self.worker_id,
            self.state,
            running,
            pending_tokens=self._pending_tokens(),
            engine_free_blocks=self.free_blocks,
            max_batch_size=shape.max_batch_size,
            total_kv_blocks=shape.num_kv_blocks,
            block_size=shape.block_size,
            resident_adapters=self.resident_adapters(),
            idle_since=self.idle_since,
        )
        self._snap, self._snap_version = snap, self.version
        return snap


def _index(seq: SimSeq) -> int:
    return seq.index
