"""GPU smoke run: a Llama-2-7B-shaped random model in bfloat16 at batch 64 with several adapters.

Weights are drawn directly on the GPU (no checkpoint, no download); adapters are written as real
PEFT directories. The point is that the engine runs this shape end to end: a 64-sequence batch,
Triton LoRA kernels over four adapters of different ranks and targets, finite logits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.worker import Engine, EngineConfig, FinishReason, SamplingParams
from lorafleet.worker.adapters import module_key
from lorafleet.worker.loader import LoadedModel
from lorafleet.worker.model import LlamaModel
from lorafleet.worker.model_config import ModelConfig

LLAMA2_7B = {
    "architecture": "LlamaForCausalLM",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_ids": (2,),
}
ADAPTER_SPECS = {
    "qv-r8": (8, ("q_proj", "v_proj")),
    "attn-r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp-r4": (4, ("gate_proj", "up_proj", "down_proj")),
    "all-r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def random_model(config: ModelConfig) -> LlamaModel:
    model = LlamaModel(config, torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name == "embed_tokens":
                p.normal_(0.0, 1.0, generator=gen)
            else:  # [out, in] projections and the LM head: unit-variance outputs
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return model.eval()


def write_adapter(path: Path, config: ModelConfig, r: int, targets: tuple[str, ...], seed: int) -> Path:
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = config.lora_shapes()
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj in targets:
            h_in, h_out = shapes[proj]
            key = f"base_model.model.{module_key(layer, proj)}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, h_in, generator=gen) * h_in**-0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(h_out, r, generator=gen) * 0.3 * r**-0.5
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.gpu
def test_llama2_7b_shape_batch64_with_adapters(tmp_path: Path) -> None:
    config = ModelConfig(**LLAMA2_7B)
    engine = Engine(
        LoadedModel(random_model(config), config, None),
        EngineConfig(max_batch_size=64, max_loras=4, max_lora_rank=16, num_kv_blocks=512),
    )
    for i, (name, (r, targets)) in enumerate(ADAPTER_SPECS.items()):
        engine.add_adapter(name, write_adapter(tmp_path / name, config, r, targets, seed=i))
    # Adapters load on a background thread; load them first so that all 64 requests share a batch.
    warm = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([[5]] * len(ADAPTER_SPECS), adapters=list(ADAPTER_SPECS), sampling=warm)
    batch_sizes: list[int] = []
    finite: list[bool] = []
    first_logits: dict[str, torch.Tensor] = {}
    run = engine.runner.run

    def spy(plan):
        logits = run(plan)
        batch_sizes.append(plan.num_seqs)
        finite.append(bool(torch.isfinite(logits).all()))
        for rid, row in zip(plan.sample_seq_ids, logits):
            first_logits.setdefault(rid, row.float().cpu())
        return logits

    engine.runner.run = spy  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (16 + i % 17,), generator=gen).tolist() for i in range(64)]
    names = [None, *ADAPTER_SPECS]
    adapters = [names[i % len(names)] for i in range(64)]
    sp = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, adapters=adapters, sampling=sp)
    seconds = time.perf_counter() - t0
    assert all(len(o.token_ids) == 4 and o.finish_reason == FinishReason.LENGTH for o in outs)
    assert max(batch_sizes) == 64 and all(finite)
    stats = engine.stats()
    assert set(stats.resident_adapters) == set(ADAPTER_SPECS)
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks
    print(f"7B-shaped batch 64, 4 new tokens: {seconds:.2f} s, steps {len(batch_sizes)}")
    # The first requests again in a small batch: their first-token logits match the batch-64 run up
    # to bf16 noise (a LoRA segment or KV mix-up would not).
    again = engine.generate(prompts[:10], adapters=adapters[:10], sampling=sp)
    for big, small in zip(outs[:10], again):
        a, b = first_logits[big.request_id], first_logits[small.request_id]
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
