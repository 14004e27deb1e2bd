"""transformers + PEFT mixed-adapter generation: the baseline column of bench_engine.py.

A Llama-shaped ``LlamaForCausalLM`` with random bf16 weights on the GPU and ``n_adapters`` LoRA
adapters (r16 on all 7 projections, random A and B, added in memory: what is timed is generation,
not loading), one adapter per row through PEFT's ``adapter_names`` batching.
"""

from __future__ import annotations

import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: dict, n_adapters: int, rank: int = 16):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=shape["max_position_embeddings"],
        rms_norm_eps=shape["rms_norm_eps"],
        rope_theta=shape.get("rope_theta", 10000.0),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", lora)
    return model.to(torch.bfloat16).eval()


@torch.inference_mode()
def tokens_per_second(model, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    names = [f"a{i % len(model.peft_config)}" for i in range(batch)]

    def run(n: int) -> None:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            adapter_names=names,
            pad_token_id=0,
        )

    run(2)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(new_tokens)
    torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - t0)
