"""Turn one scheduled step into logits: one metadata copy, then a CUDA graph or an eager forward.

A decode step on CUDA replays a graph captured at start-up for the smallest batch-size bucket that
holds it: its metadata is packed, padded to the bucket, into the persistent buffer the graph reads
(``BatchBuffers``), so the whole forward pass is one launch from the host. Padding rows read and
write nothing (KV slot -1, context length 0, a LoRA segment of slot -1). Each bucket has two graphs,
with and without the LoRA kernels, so a step without adapters pays nothing for them.

A step that carries prefill rows replays a graph of the smallest token-row bucket that holds it
(up to ``max_graph_tokens``), padded to the buffers' full sequence capacity: eagerly, such a step
pays ~250 Python kernel launches and their argument handling (H200, 7B shape, 16 prompt rows:
15-19 ms, 55-75 ms with LoRA, for 4-5 ms of GPU work). Longer steps, the CPU, ``enforce_eager``
and models with dynamic-NTK RoPE run eagerly.

Which graphs exist when is ``CaptureSchedule``'s call (``graph_capture``): with "idle", the prefill
buckets past 256 rows are captured one graph per ``capture_idle`` call, made by the engine while it
holds no sequence, and a step whose bucket has no graph yet runs eagerly.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Callable

import torch

from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.batch_buffers import BatchBuffers, PackedShape, decode_shape
from lorafleet.worker.batch_builder import BatchPlan
from lorafleet.worker.graph_capture import GraphTiming, capture_graph
from lorafleet.worker.graph_schedule import CaptureSchedule, GraphKey
from lorafleet.worker.kv_cache import KVCache
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model import LlamaModel

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Buckets 1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32 up to ``max_batch_size`` (always included).

    Fine steps where batches are small keep the padding waste low; past 64 a step is long enough
    that 32 padded rows cost little, and fewer graphs capture faster.
    """
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    while sizes[-1] < max_batch_size:
        sizes.append(sizes[-1] + 32)
    return tuple(sorted({s for s in sizes if s < max_batch_size} | {max_batch_size}))


def graph_token_sizes(max_num_batched_tokens: int, max_graph_tokens: int) -> tuple[int, ...]:
    """Token-row buckets of the graphs for steps with prefill: 32, 64, 128, 256, then every 128, up
    to the smaller of the two limits (always included).

    Past a few hundred rows a 7B step's GPU time grows with its rows and rivals the eager host time
    a graph saves (H200: a 1,025-row step without adapters took 24.1 ms eagerly and 26.6 ms as a
    1,280-row graph), so the padding there stays under 128 rows."""
    top = min(max_num_batched_tokens, max_graph_tokens)
    if top < 1:
        return ()
    sizes = [32, 64, 128, 256]
    while sizes[-1] < top:
        sizes.append(sizes[-1] + 128)
    return tuple(sorted({s for s in sizes if s < top} | {top}))


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVCache,
        lora: LoraSlotPool,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enforce_eager: bool = False,
        max_graph_tokens: int = 0,
        graph_capture: str = "start",
    ) -> None:
        self.model = model
        self.kv = kv
        self.lora = lora
        self.device = model.device
        self.width = -(-max_model_len // kv.block_size)
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self.batch_sizes = graph_batch_sizes(max_batch_size) if self.use_graphs else ()
        # Dynamic-NTK RoPE expands each sequence's length over its rows with an exact output size,
        # which padding rows outside every sequence would break: such models keep eager prefill.
        mixed = self.use_graphs and not model.rope.dynamic_factor
        self.token_sizes = graph_token_sizes(max_num_batched_tokens, max_graph_tokens) if mixed else ()
        self.schedule = CaptureSchedule(self.batch_sizes, self.token_sizes, graph_capture)
        capacity = PackedShape(
            rows=max(max_num_batched_tokens, max_batch_size),
            seqs=max_batch_size,
            segs=max_batch_size + 1,
            logits=max_batch_size,
            width=self.width,
        )
        self.buffers = BatchBuffers(capacity, self.device)
        # The latest step's sampled tokens, kept on the device: with overlapped stepping the next
        # step's forward reads its inputs from here before the host has seen them.
        self.last_tokens = torch.zeros(max_batch_size, dtype=torch.int32, device=self.device)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._mixed_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None
        self._mixed_logits: torch.Tensor | None = None
        self._pool: tuple | None = None  # the memory pool every graph shares
        self._capture_stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        self._started = False
        self.capture_timings: list[GraphTiming] = []
        self.idle_capture_error: str | None = None  # why idle captures stopped, when one failed
        self.num_graph_steps = 0
        self.num_mixed_graph_steps = 0
        self.num_eager_steps = 0
        self.num_uncaptured_steps = 0  # eager steps whose bucket's graph was not captured (yet)

    # --- capture ---
    def capture(self) -> None:
        """Capture the start-up graphs (``schedule.startup()``: largest first, one shared pool)."""
        if not self.use_graphs or self._started:
            return
        self._started = True
        self._alloc_outputs()
        for key in self.schedule.startup():
            self._capture(key, "start")
            self.schedule.mark_done(key)
        torch.cuda.synchronize(self.device)

    @property
    def idle_captures_pending(self) -> bool:
        return self._started and self.schedule.next_idle() is not None

    def capture_idle(self) -> GraphKey | None:
        """Capture the next graph left for idle moments; its key, or None when none was captured.

        Only while no step is in flight: the capture overwrites the metadata buffers and syncs the
        device. A failed capture is logged and ends the idle captures (their buckets keep running
        eagerly): an engine that is serving must not fail requests over a speed-up.
        """
        key = self.schedule.next_idle() if self._started else None
        if key is None:
            return None
        try:
            self._capture(key, "idle")
        except Exception as exc:
            self.schedule.mark_failed(key)
            self.schedule.abandon()
            self.idle_capture_error = f"{type(exc).__name__}: {exc}"
            log.warning("idle capture of %s failed, its bucket and the rest run eagerly", key, exc_info=True)
            return None
        self.schedule.mark_done(key)
        t = self.capture_timings[-1]
        log.info(
            "idle capture: %s %d rows%s %.2f s (warm-up %.2f s, capture %.2f s); %d left",
            key.kind,
            key.size,
            " with LoRA" if key.lora else "",
            t.total_s,
            t.warmup_s,
            t.capture_s,
            len(self.schedule.pending()),
        )
        return key

    def recapture(self) -> None:
        """Capture the captured graphs again (after a change to how the forward pass runs, e.g. its
        streams); those still pending stay pending."""
        if not self._started:
            return
        keys = self.schedule.captured()
        self._graphs.clear()
        self._mixed_graphs.clear()
        self._logits = self._mixed_logits = None
        self._pool = None
        torch.cuda.empty_cache()
        self._alloc_outputs()
        for key in keys:
            self._capture(key, "recapture")
        torch.cuda.synchronize(self.device)

    def _alloc_outputs(self) -> None:
        # Outside every graph's pool: the logits outlive each replay.
        vocab = self.model.config.vocab_size
        self._logits = torch.empty(self.batch_sizes[-1], vocab, dtype=torch.float32, device=self.device)
        if self.token_sizes:
            cap = self.buffers.capacity
            self._mixed_logits = torch.empty(cap.logits, vocab, dtype=torch.float32, device=self.device)

    def _capture(self, key: GraphKey, at: str) -> None:
        assert self._capture_stream is not None
        empty = BatchPlan.empty()
        forward: Callable[[], None]
        if key.kind == "prefill":
            layout = self.buffers.upload(empty, pad_rows=key.size)
            # A row count past one selects the prefill attention kernel, launched for queries of up
            # to ``key.size`` rows: the widest the bucket can hold.
            layout = dataclasses.replace(layout, max_query_len=key.size)
            forward = functools.partial(self._forward_mixed, layout, key.lora)
            graphs = self._mixed_graphs
        else:
            shape = decode_shape(key.size, self.width)
            # Every row padding: the warm-up (which compiles the kernels) and the capture write nothing.
            layout = self.buffers.upload(empty, pad_to=key.size, width=self.width)
            forward = functools.partial(self._forward_into_logits, layout, shape, key.lora)
            graphs = self._graphs
        graph, timing = capture_graph(
            forward, key=key, at=at, device=self.device, stream=self._capture_stream, pool=self._pool
        )
        self._pool = graph.pool()
        graphs[(key.size, key.lora)] = graph
        self.capture_timings.append(timing)

    def _forward_into_logits(self, layout, shape: PackedShape, use_lora: bool) -> None:
        assert self._logits is not None
        layout = self._resolve_inputs(layout)
        logits = self.model.forward_all_logits(layout, self.kv, self.lora if use_lora else None)
        self._logits[: shape.rows].copy_(logits)

    def _forward_mixed(self, layout: BatchLayout, use_lora: bool) -> None:
        assert self._mixed_logits is not None
        logits = self.model(self._resolve_inputs(layout), self.kv, self.lora if use_lora else None)
        self._mixed_logits.copy_(logits)

    def _resolve_inputs(self, layout: BatchLayout) -> BatchLayout:
        """Rows whose input is the previous step's sampled token take it from ``last_tokens``."""
        src = layout.input_src
        assert src is not None
        from_device = self.last_tokens.index_select(0, src.clamp(min=0))
        return dataclasses.replace(layout, input_ids=torch.where(src >= 0, from_device, layout.input_ids))

    def record_tokens(self, tokens: torch.Tensor) -> None:
        """Keep this step's sampled tokens [N] (in sample order) for the next step's inputs."""
        self.last_tokens[: tokens.shape[0]].copy_(tokens)

    # --- steps ---
    def graph_size_for(self, plan: BatchPlan) -> int | None:
        """The bucket a step replays in, or None when it runs eagerly."""
        # A decode row that does not sample (a recompute cut to one token by the budget) runs eagerly.
        if not self._graphs or not plan.is_decode_only or len(plan.logits_indices) != plan.num_seqs:
            return None
        size = _bucket(self.batch_sizes, plan.num_seqs)
        return size if (size, plan.uses_lora) in self._graphs else None

    def token_size_for(self, plan: BatchPlan) -> int | None:
        """The token-row bucket a step with prefill rows replays in, or None when it runs eagerly
        (too many rows, or its bucket's graph is not captured yet)."""
        if plan.num_tokens == 0:
            return None
        rows = _bucket(self.token_sizes, plan.num_tokens)
        return rows if (rows, plan.uses_lora) in self._mixed_graphs else None

    def run(self, plan: BatchPlan) -> torch.Tensor:
        """Logits ``[len(plan.logits_indices), vocab]`` float32, in ``plan.sample_seq_ids`` order."""
        use_lora = plan.uses_lora
        size = self.graph_size_for(plan)
        if size is not None:
            assert self._logits is not None
            self.buffers.upload(plan, pad_to=size, width=self.width)
            self._graphs[(size, use_lora)].replay()
            self.num_graph_steps += 1
            # A decode step samples every row, in row order.
            return self._logits[: plan.num_seqs]
        rows = self.token_size_for(plan)
        if rows is not None:
            assert self._mixed_logits is not None
            self.buffers.upload(plan, pad_rows=rows)
            self._mixed_graphs[(rows, use_lora)].replay()
            self.num_mixed_graph_steps += 1
            return self._mixed_logits[: len(plan.logits_indices)]
        batch = self.buffers.upload(plan)
        if plan.reads_inflight:
            batch = self._resolve_inputs(batch)
        self.num_eager_steps += 1
        if plan.num_tokens and _bucket(self.token_sizes, plan.num_tokens) is not None:
            self.num_uncaptured_steps += 1
        return self.model(batch, self.kv, self.lora if use_lora else None)


def _bucket(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest of the sorted ``sizes`` that holds ``n``, or None."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
