"""Shared set-up of the engine benchmarks: model shapes, random weights, adapter popularity, and
decode batches installed straight into an engine's paged cache.

Installing a batch skips the prefill (which would cost more device time than every measured decode
step together): each sequence gets real KV blocks from the engine's allocator, a real LoRA slot and
``num_computed_tokens`` = its context, so the next ``Engine.step`` is an ordinary decode over the real
paged cache, scheduler, runner and sampler. The cache holds whatever the blocks held before: a
decode step's cost does not depend on the values it reads.
"""

from __future__ import annotations

import math
import random

import torch

from lorafleet.worker import Engine, EngineConfig, SamplingParams
from lorafleet.worker.demo_shapes import SHAPES as MODEL_SHAPES
from lorafleet.worker.loader import LoadedModel
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model import LlamaModel
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.sequence import SeqStatus, Sequence
from lorafleet.worker.types import Request

# The benchmarked shapes, from the project's one shape table; the tokens the bench never stops on.
SHAPES: dict[str, dict] = {
    name: {**MODEL_SHAPES[name].config_dict(), "bos_token_id": 1, "eos_token_ids": (2,)}
    for name in ("tiny", "llama2-7b", "llama3-8b")
}
POPULARITIES = ("backbone", "identical", "uniform", "skewed", "distinct")


def model_config(shape: str) -> ModelConfig:
    return ModelConfig(**SHAPES[shape])


def random_model(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> LlamaModel:
    """Random weights drawn on ``device``, scaled so every projection has unit-variance outputs."""
    model = LlamaModel(config, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name == "embed_tokens":
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return model.eval()


def fill_pool(pool: LoraSlotPool, ranks: list[int], seed: int = 0) -> None:
    """Random adapters in every slot; slot k gets rank ``ranks[k % len(ranks)]`` on every projection."""
    gen = torch.Generator(device=pool.device).manual_seed(seed)
    slot_ranks = torch.tensor(
        [ranks[k % len(ranks)] for k in range(pool.n_slots)], dtype=torch.int32, device=pool.device
    )
    # The pool's contract: zeros past each slot's rank.
    keep = (torch.arange(pool.r_max, device=pool.device)[None, :] < slot_ranks[:, None]).to(pool.dtype)
    for layer in range(pool.num_layers):
        for proj in pool.target_modules:
            pl = pool.get(layer, proj)
            assert pl is not None
            pl.a.normal_(0.0, pl.a.shape[-1] ** -0.5, generator=gen).mul_(keep[:, :, None])
            pl.b.normal_(0.0, 0.3 * pool.r_max**-0.5, generator=gen).mul_(keep[:, None, :])
            pl.ranks.copy_(slot_ranks)
            pl.scales.fill_(2.0)


def slot_bytes(pool: LoraSlotPool, slot: int) -> int:
    """Adapter bytes a step reads for ``slot``: A and B of every projection up to the true rank."""
    total = 0
    for layer in range(pool.num_layers):
        for proj in pool.target_modules:
            pl = pool.get(layer, proj)
            assert pl is not None
            h_in, h_out = pool.shapes[proj]
            total += int(pl.ranks[slot]) * (h_in + h_out) * pl.a.element_size()
    return total


def popularity_slots(popularity: str, batch: int, n_slots: int, rng: random.Random) -> list[int]:
    """Punica's popularities: a LoRA slot per row (-1 = no adapter), rows of one adapter adjacent."""
    if popularity == "backbone":
        return [-1] * batch
    if popularity == "identical":
        return [0] * batch
    if popularity == "distinct":
        # More rows than slots cannot all differ: the slots then repeat round-robin.
        return [i % n_slots for i in range(batch)]
    if popularity == "uniform":
        n = min(n_slots, math.ceil(math.sqrt(batch)))
        return sorted(rng.randrange(n) for _ in range(batch))
    if popularity == "skewed":  # Zipf alpha 1.5: adapter i is 1.5x as popular as adapter i+1
        weights = [1.5**-i for i in range(n_slots)]
        return sorted(rng.choices(range(n_slots), weights=weights, k=batch))
    raise ValueError(f"unknown popularity {popularity!r}")


def make_engine(model: LlamaModel, config: ModelConfig, **engine_config) -> Engine:
    return Engine(LoadedModel(model, config, None), EngineConfig(**engine_config))


def install_decode_batch(engine: Engine, slots: list[int], context: int, rng: random.Random) -> list[str]:
    """Running sequences whose next step is a decode at ``context``; returns their request ids."""
    vocab = engine.model_config.vocab_size
    sampling = SamplingParams(max_new_tokens=256, temperature=0.0, ignore_eos=True)
    ids = []
    for i, slot in enumerate(slots):
        rid = f"bench-{context}-{i}"
        prompt = tuple(rng.randrange(3, vocab) for _ in range(context))
        seq = Sequence(Request(rid, prompt, None, sampling), next(engine._arrivals))
        seq.block_table = engine.allocator.allocate(engine.allocator.blocks_needed(context))
        seq.num_computed_tokens = context - 1  # the last prompt token is this step's decode row
        seq.lora_slot = slot
        seq.status = SeqStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine._seqs[rid] = seq
        ids.append(rid)
    return ids


def remove_batch(engine: Engine, ids: list[str]) -> None:
    for rid in ids:
        engine.abort(rid)
