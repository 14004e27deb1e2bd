"""The worker engine: requests in, tokens out, one batched forward pass per ``step``.

Life of a request here: ``add_request`` validates it and queues a ``Sequence``; each ``step`` the
scheduler picks running and newly admitted sequences (pinning their adapters' GPU slots and
allocating KV blocks), the batch builder lays their rows out by adapter slot, the model runs one
forward pass, the sampler draws one token for every sequence whose prompt is fully in the cache,
and the stop checker decides whether it is done. Finished sequences free their blocks and pins at
once. ``export`` / ``import_`` move a sequence between engines by its tokens alone.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.worker.adapter_cache import AdapterCache
from lorafleet.worker.batch_builder import plan_batch
from lorafleet.worker.batching import Scheduler, SchedulerOutput
from lorafleet.worker.block_allocator import KVBlockAllocator
from lorafleet.worker.engine_config import EngineConfig
from lorafleet.worker.generate_output import assemble_output, encode_prompt
from lorafleet.worker.kv_cache import KVCache, resolve_dtype
from lorafleet.worker.loader import LoadedModel, load_model
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model_runner import ModelRunner
from lorafleet.worker.sampling import SampledTokens, Sampler
from lorafleet.worker.sequence import SeqStatus, Sequence
from lorafleet.worker.startup_timing import StartupTimes, log_captures
from lorafleet.worker.stop_checker import StopChecker
from lorafleet.worker.types import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    Request,
    SamplingParams,
    SequenceState,
    TokenDelta,
)


@dataclass
class _LaunchedStep:
    """A forward pass queued on the device whose sampled tokens the host has not applied yet."""

    seqs: list[Sequence]  # in sample order: row i of ``sampled`` is seqs[i]'s next token
    sampled: SampledTokens


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device = self.model.device
        self.dtype = self.model.dtype
        cfg, mc = self.config, self.model_config
        if cfg.max_model_len is not None and cfg.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {cfg.max_model_len} exceeds the model's max_position_embeddings "
                f"{mc.max_position_embeddings}"
            )
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        self.startup = StartupTimes()
        if loaded.load_seconds is not None:
            self.startup.add("model load", loaded.load_seconds)
        with self.startup.phase("LoRA slots and adapter cache"):
            self.lora_pool = LoraSlotPool(
                mc.num_hidden_layers,
                mc.lora_shapes(),
                cfg.max_loras,
                cfg.max_lora_rank,
                self.dtype,
                self.device,
                cfg.lora_target_modules,
            )
            self.adapters = AdapterCache(
                mc, self.lora_pool, host_cache_bytes=cfg.host_cache_bytes, dtype=self.dtype
            )
            self.adapters.reserve_pinned_buffers()
        with self.startup.phase("KV cache"):
            num_blocks = self._num_kv_blocks()
            self.kv = KVCache(mc, num_blocks, cfg.block_size, self.dtype, self.device)
            self.allocator = KVBlockAllocator(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(
            self.allocator,
            self.adapters,
            max_batch_size=cfg.max_batch_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self.runner = ModelRunner(
            self.model,
            self.kv,
            self.lora_pool,
            max_batch_size=cfg.max_batch_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enforce_eager=cfg.enforce_eager,
            max_graph_tokens=cfg.max_graph_tokens,
            graph_capture=cfg.graph_capture,
        )
        if cfg.lora_side_stream != "off" and self.device.type == "cuda":
            self.lora_pool.stream = torch.cuda.Stream(self.device)
            self.lora_pool.side_mode = cfg.lora_side_stream
        self.runner.capture()
        log_captures(self.startup, self.runner.capture_timings, len(self.runner.schedule.pending()))
        self.sampler = Sampler(cfg.seed)
        eos = mc.eos_token_ids
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.stop_checker = StopChecker(self.tokenizer, eos, self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._generate_ids = itertools.count()
        self._overlap = (
            cfg.async_scheduling if cfg.async_scheduling is not None else self.device.type == "cuda"
        )
        self._inflight: _LaunchedStep | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
        skip_tokenizer_init: bool = False,
        **tuning: Any,
    ) -> Engine:
        """Load a Hugging Face model directory; ``tuning`` keywords are EngineConfig fields.

        A folder without tokenizer.json loads too (as does any folder with ``skip_tokenizer_init``,
        vLLM's name): the engine then takes token-id prompts only, and a text prompt or a stop string
        is a ValueError saying so. The fleet sends token ids, so a tokenizer-less model serves fine.
        """
        if config is not None and tuning:
            raise ValueError("pass either config or tuning keywords, not both")
        engine_config = config or EngineConfig.from_dict(tuning)
        loaded = load_model(
            model_dir,
            device=device,
            dtype=resolve_dtype(dtype),
            require_tokenizer=False,
            skip_tokenizer=skip_tokenizer_init,
        )
        return cls(loaded, engine_config)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.gpu_memory_fraction)
        else:
            budget = cfg.cpu_kv_cache_bytes
        blocks = KVCache.num_blocks_for_budget(self.model_config, cfg.block_size, self.dtype, budget)
        if cfg.kv_cache_bytes is not None:
            return blocks
        # A derived budget is capped at what a full batch of maximal sequences can use.
        return min(blocks, cfg.max_batch_size * -(-self.max_model_len // cfg.block_size))

    # --- adapters ---
    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Register a PEFT adapter directory (validated now, loaded on first use)."""
        self.adapters.register(name, adapter_dir)

    def remove_adapter(self, name: str) -> None:
        users = [s.request_id for s in self._seqs.values() if s.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is used by unfinished request {users[0]!r}")
        self.adapters.unregister(name)

    def list_adapters(self) -> dict[str, str]:
        return self.adapters.registered()

    # --- requests ---
    def _validate(self, request: Request, num_output_tokens: int = 0) -> None:
        rid = request.request_id
        if rid in self._seqs:
            raise ValueError(f"request {rid!r} is already in the engine")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise KeyError(f"request {rid}: unknown adapter {request.adapter!r}")
        vocab = self.model_config.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {rid}: token id {bad[0]} outside the vocabulary [0, {vocab})")
        params = request.sampling
        if params.stop and self.tokenizer is None:
            # Without a tokenizer there is no output text to search, so the stop would never match.
            raise ValueError(
                f"request {rid}: stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {rid}: stop token id {bad[0]} outside the vocabulary [0, {vocab})")
        n = len(request.prompt_token_ids) + num_output_tokens
        if n >= self.max_model_len:
            raise ValueError(
                f"request {rid}: {n} tokens leave no room to generate within the context limit of "
                f"{self.max_model_len} tokens"
            )
        if num_output_tokens >= params.max_new_tokens:
            raise ValueError(f"request {rid}: already has max_new_tokens={params.max_new_tokens} tokens")
        longest = min(len(request.prompt_token_ids) + params.max_new_tokens, self.max_model_len)
        if self.allocator.blocks_needed(longest) > self.allocator.num_blocks:
            raise ValueError(
                f"request {rid}: up to {longest} tokens need {self.allocator.blocks_needed(longest)} KV "
                f"blocks but the cache holds only {self.allocator.num_blocks}"
            )

    def add_request(self, request: Request) -> None:
        """Queue a request. ValueError for a bad request, KeyError for an unknown adapter."""
        if not isinstance(request, Request):
            raise ValueError(f"add_request expects a Request, got {type(request).__name__}")
        self._validate(request)
        seq = Sequence(request, next(self._arrivals))
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def abort(self, request_id: str) -> TokenDelta | None:
        """Cancel a request; its final delta (ABORT), or None when it is not here."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        return TokenDelta(
            request_id, (), finish_reason=FinishReason.ABORT, num_prompt_tokens=seq.num_prompt_tokens
        )

    def export(self, request_ids: Seq[str]) -> list[SequenceState]:
        """Remove unfinished sequences and return what resumes them elsewhere (KeyError if unknown)."""
        missing = [r for r in request_ids if r not in self._seqs]
        if missing:
            raise KeyError(f"cannot export unknown or finished request {missing[0]!r}")
        # Checked before removing anything: a repeated id would otherwise fail half-way and drop
        # the sequences already taken out.
        if len(set(request_ids)) != len(request_ids):
            raise ValueError("export: the same request id appears twice")
        states = []
        for rid in request_ids:
            seq = self._seqs.pop(rid)
            self.scheduler.remove(seq)
            seq.status = SeqStatus.FINISHED
            states.append(seq.to_state())
        return states

    def import_(self, states: Seq[SequenceState]) -> None:
        """Resume exported sequences here; their KV cache is recomputed before the next token."""
        bad_type = [s for s in states if not isinstance(s, SequenceState)]
        if bad_type:
            raise ValueError(f"import_ expects SequenceState, got {type(bad_type[0]).__name__}")
        ids = [s.request.request_id for s in states]
        if len(set(ids)) != len(ids):
            raise ValueError("import_: the same request id appears twice")
        vocab = self.model_config.vocab_size
        for state in states:
            rid = state.request.request_id
            self._validate(state.request, len(state.output_token_ids))
            if any(not 0 <= t < vocab for t in state.output_token_ids):
                raise ValueError(f"request {rid}: output token outside the vocabulary")
            for what, values in (
                ("output logprobs", state.output_logprobs),
                ("output top logprobs", state.output_top_logprobs),
            ):
                if values is not None and len(values) != len(state.output_token_ids):
                    raise ValueError(
                        f"request {rid}: {len(values)} {what} for {len(state.output_token_ids)} tokens"
                    )
        for state in states:
            seq = Sequence(state.request, next(self._arrivals))
            self.stop_checker.restore(seq, state)
            self._seqs[state.request.request_id] = seq
            self.scheduler.add(seq)

    # --- stepping ---
    def step(self) -> list[TokenDelta]:
        """Run one batched forward pass; a delta for every sequence that got tokens or finished.

        With overlapped stepping (``async_scheduling``) the pass is queued on the device and this
        returns the *previous* pass's deltas: the host turns those tokens into text, checks stops
        and schedules the next pass while the device computes. A sequence that turns out to have
        finished was stepped once more for nothing; that token is dropped.
        """
        out = self.scheduler.schedule()
        deltas = [self._fail(seq, msg) for seq, msg in self.scheduler.take_failed()]
        launched: _LaunchedStep | None = None
        if out.scheduled:
            try:
                launched = self._launch(out)
            except Exception as exc:  # fail this batch's requests with the reason, never lose them
                deltas += [self._fail(s.seq, _describe(exc)) for s in out.scheduled]
        previous, self._inflight = self._inflight, None
        if previous is not None:
            deltas += self._collect(previous)
        if launched is not None:
            if self._overlap:
                self._inflight = launched
            else:
                deltas += self._collect(launched)
        elif previous is None and not out.scheduled and self.adapters.loading():
            # Nothing can run until an adapter load lands: block briefly instead of spinning.
            self.adapters.wait_for_loads(0.005)
        return deltas

    def has_idle_work(self) -> bool:
        """Whether ``run_idle_work`` would capture a graph now: some are left for idle moments
        (``graph_capture="idle"``) and the engine holds no sequence. A driver asks this when it would
        otherwise wait for requests."""
        return not self._seqs and self.runner.idle_captures_pending

    def run_idle_work(self) -> bool:
        """Capture the next graph left for idle moments, only while the engine holds no sequence;
        whether one was captured. No step ever waits on it: a request that arrives meanwhile waits
        for this one graph at most (a warm-up pass and a capture), and the next call sees it.
        """
        if not self.has_idle_work():
            return False
        if self._inflight is not None:
            # With overlap, a pass launched for sequences that are gone since (finished, aborted or
            # exported) stays queued until the next step: settle it, so the capture starts idle.
            self._collect(self._inflight)
            self._inflight = None
        if self.adapters.loading():
            # The loader thread's pinned-memory calls may not overlap a capture; a short wait keeps a
            # driver that calls again at once from spinning.
            self.adapters.wait_for_loads(0.005)
            return False
        return self.runner.capture_idle() is not None

    def _launch(self, out: SchedulerOutput) -> _LaunchedStep:
        """Queue the forward pass and the sampling of ``out`` on the device; no host sync."""
        plan = plan_batch(out.scheduled, self.config.block_size)
        self.adapters.wait_for([s.seq.adapter for s in out.scheduled])
        logits = self.runner.run(plan)
        seqs = [self._seqs[rid] for rid in plan.sample_seq_ids]
        sampled = self.sampler.launch(
            logits,
            [s.request.sampling for s in seqs],
            [len(s.output_token_ids) + s.num_inflight for s in seqs],
        )
        self.runner.record_tokens(sampled.device_tokens)
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
        for row, seq in enumerate(seqs):
            seq.num_inflight += 1
            seq.inflight_row = row
        return _LaunchedStep(seqs, sampled)

    def _collect(self, step: _LaunchedStep) -> list[TokenDelta]:
        """Wait for a launched pass's tokens and apply them: text, stop checks, deltas."""
        live = [seq for seq in step.seqs if self._seqs.get(seq.request_id) is seq]
        try:
            tokens, logprobs = step.sampled.result()
        except Exception as exc:
            return [self._fail(seq, _describe(exc)) for seq in live]
        rows = []  # (sequence, its sampled row) of the sequences still here
        for i, seq in enumerate(step.seqs):
            seq.num_inflight -= 1
            if self._seqs.get(seq.request_id) is seq:  # not aborted, exported or failed meanwhile
                rows.append((seq, i))
        seqs = [seq for seq, _ in rows]
        sent = [seq.delivered_len for seq in seqs]
        tops = step.sampled.top_logprobs()
        if tops is not None:
            for seq, i in rows:
                seq.add_top_logprobs(tops[i])
        reasons = self.stop_checker.append_tokens(
            [(seq, tokens[i], logprobs[i] if logprobs else None) for seq, i in rows]
        )
        deltas = []
        for seq, reason, delivered in zip(seqs, reasons, sent):
            new_tokens, new_logprobs = seq.take_pending()
            new_tops = seq.take_pending_top_logprobs()
            if reason is not None:
                self._finish(seq)
            deltas.append(
                TokenDelta(
                    seq.request_id,
                    tuple(new_tokens),
                    seq.text[delivered : seq.delivered_len],
                    tuple(new_logprobs) if new_logprobs is not None else None,
                    reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    new_top_logprobs=tuple(new_tops) if new_tops is not None else None,
                )
            )
        return deltas

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        self._seqs.pop(seq.request_id, None)

    def _fail(self, seq: Sequence, message: str) -> TokenDelta:
        self._finish(seq)
        return TokenDelta(
            seq.request_id,
            (),
            finish_reason=FinishReason.ERROR,
            error=message,
            num_prompt_tokens=seq.num_prompt_tokens,
        )

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Entries of every per-request and per-adapter structure (soak leak checks; the request ones
        return to zero once the engine is idle)."""
        return {
            "seqs": len(self._seqs),
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_used": self.allocator.num_blocks - self.allocator.num_free,
            **self.adapters.bookkeeping_sizes(),
        }

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            max_batch_size=self.config.max_batch_size,
            num_free_kv_blocks=self.allocator.num_free,
            num_total_kv_blocks=self.allocator.num_blocks,
            block_size=self.config.block_size,
            resident_adapters=self.adapters.resident(),
            running_request_ids=tuple(s.request_id for s in self.scheduler.running),
            num_preemptions=self.scheduler.num_preemptions,
            num_adapter_loads=self.adapters.loads,
            adapter_cache_hits=self.adapters.hits,
            adapter_cache_misses=self.adapters.misses,
            adapter_load_seconds=self.adapters.take_load_seconds(),
        )

    # --- offline API ---
    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]],
        adapters: str | Seq[str | None] | None = None,
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Run ``prompts`` (text or token ids) to completion; one output per prompt, in order.

        The engine is idle when this is called, so it first captures one graph left for idle moments
        (``run_idle_work``): across calls, every bucket's graph comes to exist."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list (of strings or token-id lists), not one string")
        prompts = list(prompts)
        n = len(prompts)
        adapter_list = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        params = [sampling or SamplingParams()] * n if not isinstance(sampling, Seq) else list(sampling)
        if len(adapter_list) != n or len(params) != n:
            raise ValueError(
                f"{n} prompts but {len(adapter_list)} adapters and {len(params)} sampling params"
            )
        if self._seqs:
            raise RuntimeError("generate() needs an idle engine; drive online requests with step()")
        batch_id = next(self._generate_ids)
        requests = []
        for i, (prompt, adapter, p) in enumerate(zip(prompts, adapter_list, params)):
            ids = encode_prompt(self.tokenizer, prompt, i)
            req = Request(f"generate-{batch_id}-{i}", tuple(ids), adapter, p)
            self._validate(req)
            requests.append(req)
        self.run_idle_work()
        for req in requests:
            self.add_request(req)
        collected: dict[str, list[TokenDelta]] = {r.request_id: [] for r in requests}
        try:
            while self.has_unfinished():
                for delta in self.step():
                    collected[delta.request_id].append(delta)
        except BaseException:
            # Leave the engine idle (blocks and adapter pins freed) so the caller can go on using it.
            for req in requests:
                self.abort(req.request_id)
            raise
        return [assemble_output(r, collected[r.request_id]) for r in requests]
