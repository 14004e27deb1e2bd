"""Per-request state of a simulation: the `RequestRecord` the simulator reports for each request,
and the `SimSeq` a worker holds while the request is placed on it.

Both use `__slots__`: a run keeps one record per request, millions of them on a long trace.
"""

from __future__ import annotations


class RequestRecord:
    """What the simulator reports per request (filled in as it runs)."""

    __slots__ = (
        "adapter",
        "arrival",
        "evictions",
        "finish",
        "first_token",
        "migrations",
        "output_tokens",
        "preemptions",
        "prompt_tokens",
        "rejected",
        "rid",
        "worker",
    )

    def __init__(self, rid: str, arrival: float, adapter: str | None, prompt: int, output: int) -> None:
        self.rid = rid
        self.arrival = arrival
        self.adapter = adapter
        self.prompt_tokens = prompt
        self.output_tokens = output
        self.first_token: float | None = None
        self.finish: float | None = None
        self.worker = ""
        self.migrations = 0
        self.evictions = 0
        self.preemptions = 0
        self.rejected = ""


class SimSeq:
    """A request placed on a worker: `prompt` tokens to prefill (prompt + earlier output when
    resumed), then `output` tokens to generate."""

    __slots__ = (
        "adapter",
        "blocks",
        "computed",
        "exporting",
        "first_pending",
        "generated",
        "index",
        "output",
        "placed_at",
        "prompt",
        "record",
        "running",
    )

    def __init__(self, record: RequestRecord, prompt: int, output: int, placed_at: float) -> None:
        self.record = record
        self.adapter = record.adapter
        self.prompt = prompt
        self.output = output
        self.placed_at = placed_at
        self.computed = 0  # tokens with KV in this worker's blocks
        self.generated = 0  # tokens generated on this worker
        self.blocks = 0
        self.index = 0  # the worker's admission order: FCFS, and "newest" for preemption
        self.running = False
        self.exporting = False
        # Its request's first token is still to come (read once here, so that a step need not
        # touch the record until the sequence's first token or its finish).
        self.first_pending = record.first_token is None

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.generated
