"""The paged, fused, multi-LoRA model against transformers (+ PEFT) as the oracle.

Batches are built by hand here (not by the engine) so the model is tested on its own: prompts are
prefilled in one chunk or several, decoded token by token, with KV blocks deliberately scattered.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.worker.batch import BatchLayout
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.kv_cache import KVCache
from lorafleet.worker.loader import load_model
from lorafleet.worker.lora_pool import PROJECTIONS, LoraSlotPool

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BLOCK = 4


class PagedRunner:
    """Drives the model step by step like an engine would, with hand-picked scattered blocks."""

    def __init__(self, model, num_blocks: int = 64, device: str = "cpu", dtype=torch.float32, seed: int = 0):
        self.model = model
        self.device = device
        self.exact = dtype == torch.float32
        self.kv = KVCache(model.config, num_blocks, BLOCK, dtype, device)
        # A shuffled free list: consecutive blocks of one sequence are not adjacent in memory.
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, entries: list[tuple[str, list[int], int]], lora=None) -> dict[str, torch.Tensor]:
        """entries: (seq id, new token ids, adapter slot or -1), already sorted by slot.

        Returns each sequence's logits rows [len(new ids), vocab] (forward_all_logits), and checks
        ``forward`` returns exactly the rows of the last tokens.
        """
        ids, pos, slots_map, qlens, ctx = [], [], [], [], []
        for sid, new, _ in entries:
            start = self.lens.get(sid, 0)
            blocks = self.blocks.setdefault(sid, [])
            for p in range(start, start + len(new)):
                if p // BLOCK >= len(blocks):
                    blocks.append(self.free.pop())
                slots_map.append(blocks[p // BLOCK] * BLOCK + p % BLOCK)
                pos.append(p)
            ids += new
            qlens.append(len(new))
            ctx.append(start + len(new))
            self.lens[sid] = start + len(new)
        width = max(len(self.blocks[sid]) for sid, _, _ in entries) + 2
        table = torch.full((len(entries), width), -1, dtype=torch.int32)
        for b, (sid, _, _) in enumerate(entries):
            table[b, : len(self.blocks[sid])] = torch.tensor(self.blocks[sid], dtype=torch.int32)
        starts = [0]
        for q in qlens:
            starts.append(starts[-1] + q)
        seg_ptr, seg_slots = [0], []
        for (_, _new, slot), end in zip(entries, starts[1:]):
            if seg_slots and seg_slots[-1] == slot:
                seg_ptr[-1] = end
            else:
                seg_slots.append(slot)
                seg_ptr.append(end)
        dev = self.device
        batch = BatchLayout(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(pos, device=dev),
            seq_ids=tuple(e[0] for e in entries),
            query_lens=tuple(qlens),
            context_lens=tuple(ctx),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            block_tables=table.to(dev),
            slot_mapping=torch.tensor(slots_map, device=dev),
            max_query_len=max(qlens),
            max_context_len=max(ctx),
            lora_seg_indptr=torch.tensor(seg_ptr, dtype=torch.int32, device=dev),
            lora_seg_slots=torch.tensor(seg_slots, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor([s - 1 for s in starts[1:]], device=dev),
            sample_seq_ids=tuple(e[0] for e in entries),
        )
        # Run the step twice over a copy of the cache: the sampled-rows path must agree with all rows.
        saved = [t.clone() for t in self.kv.k + self.kv.v]
        all_logits = self.model.forward_all_logits(batch, self.kv, lora)
        n = len(self.kv.k)
        for i, t in enumerate(saved):
            (self.kv.k if i < n else self.kv.v)[i % n].copy_(t)
        sampled = self.model(batch, self.kv, lora)
        assert sampled.dtype == torch.float32 and sampled.shape == (len(entries), all_logits.shape[1])
        # (a different row count may change the matmul's blocking: round-off only)
        assert_logits_close(sampled, all_logits[batch.logits_indices], rel=1e-5 if self.exact else 2e-2)
        return {sid: all_logits[a:b] for (sid, _, _), a, b in zip(entries, starts, starts[1:])}


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo"), num_adapters=8, seed=3).model_dir


@pytest.fixture(scope="module")
def reference(demo):
    return transformers.LlamaForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()


def ref_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def test_prefill_chunks_and_decode_match_transformers(demo, reference):
    lm = load_model(demo)
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, once upon a time")
    assert len(prompt) > 2 * BLOCK
    one, two = PagedRunner(lm.model, seed=1), PagedRunner(lm.model, seed=2)
    got_one = one.step([("s", prompt, -1)])["s"]
    cut = 7  # splits a block: the second chunk starts mid-block on top of cached context
    got_two = torch.cat([two.step([("s", prompt[:cut], -1)])["s"], two.step([("s", prompt[cut:], -1)])["s"]])
    want = ref_logits(reference, prompt)
    assert_logits_close(got_one, want)
    assert_logits_close(got_two, want)
    seq = list(prompt)
    decoded = []
    for _ in range(6):
        nxt = int(got_one[-1].argmax()) if not decoded else int(decoded[-1].argmax())
        seq.append(nxt)
        decoded.append(one.step([("s", [nxt], -1)])["s"][0])
    want = ref_logits(reference, seq)
    assert_logits_close(torch.stack(decoded), want[len(prompt) :])


def test_mixed_prefill_and_decode_batch(demo, reference):
    """Sequences at different stages share one step: decodes, a fresh prompt, a second chunk."""
    lm = load_model(demo)
    tok = lm.tokenizer
    a = tok.encode("Low-rank adapters add a small update")
    b = tok.encode("def add(a, b): return a + b")
    c = tok.encode("Numbers like 42 and 2024 appear in text")
    d = tok.encode("Hello")
    run = PagedRunner(lm.model, seed=5)
    run.step([("a", a, -1), ("d", d, -1), ("c", c[:5], -1)])
    out = run.step([("a", [17], -1), ("b", b, -1), ("d", [99], -1), ("c", c[5:], -1)])
    assert_logits_close(out["a"], ref_logits(reference, [*a, 17])[-1:])
    assert_logits_close(out["b"], ref_logits(reference, b))
    assert_logits_close(out["d"], ref_logits(reference, [*d, 99])[-1:])
    assert_logits_close(out["c"], ref_logits(reference, c)[5:])


# --- LoRA ---


def load_adapter_into_slot(pool: LoraSlotPool, slot: int, adapter_dir: Path) -> None:
    """A minimal PEFT reader for the test (the engine has its own): fills one slot of the pool."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for layer in range(pool.num_layers):
        for proj in PROJECTIONS:
            pl = pool.get(layer, proj)
            module = ("self_attn." if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + proj
            key = f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"
            if pl is None or key not in tensors:
                continue
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            r = ranks.get(proj, cfg["r"])
            alpha = alphas.get(proj, cfg["lora_alpha"])
            assert a.shape[0] == r
            pl.a[slot, :r] = a.to(pl.a.dtype)
            pl.b[slot, :, :r] = b.to(pl.b.dtype)
            pl.ranks[slot] = r
            pl.scales[slot] = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)


def run_lora_case(demo: Path, device: str, dtype: torch.dtype):
    """One batch of base rows beside four adapters, prefill + 3 decode steps; returns (got, wanted)."""
    lm = load_model(demo, device=device, dtype=dtype)
    names = ["adapter-1", "adapter-2", "adapter-5", "adapter-6"]  # all-7 r4, rsLoRA, rank_pattern, k+up
    pool = LoraSlotPool(lm.config.num_hidden_layers, lm.config.lora_shapes(), 5, 16, dtype, device)
    slot_of = {name: s for s, name in zip([3, 0, 4, 1], names)}
    for name, slot in slot_of.items():
        load_adapter_into_slot(pool, slot, demo / "adapters" / name)
    tok = lm.tokenizer
    prompts = {
        "base": (None, tok.encode("Once upon a time there was")),
        "x": ("adapter-1", tok.encode("The quick brown fox")),
        "y": ("adapter-2", tok.encode("Each request asks for a different fine-tune")),
        "y2": ("adapter-2", tok.encode("Hello")),
        "z": ("adapter-5", tok.encode("for i in range(10): print(i)")),
        "w": ("adapter-6", tok.encode("the the and and of")),
    }
    slot = {s: -1 if prompts[s][0] is None else slot_of[prompts[s][0]] for s in prompts}
    order = sorted(prompts, key=lambda s: slot[s])
    run = PagedRunner(lm.model, device=device, dtype=dtype, seed=9)
    got = run.step([(s, prompts[s][1], slot[s]) for s in order], lora=pool)
    seqs = {s: list(prompts[s][1]) for s in prompts}
    rows = {s: [got[s]] for s in prompts}
    for _ in range(3):
        nxt = {s: int(rows[s][-1][-1].argmax()) for s in prompts}
        for s in prompts:
            seqs[s].append(nxt[s])
        out = run.step([(s, [nxt[s]], slot[s]) for s in order], lora=pool)
        for s in prompts:
            rows[s].append(out[s])

    base = transformers.LlamaForCausalLM.from_pretrained(demo, dtype=dtype).to(device).eval()
    wanted = {s: ref_logits(base, seqs[s]) for s in prompts if prompts[s][0] is None}
    ref = peft.PeftModel.from_pretrained(base, demo / "adapters" / names[0], adapter_name=names[0])
    for name in names[1:]:
        ref.load_adapter(demo / "adapters" / name, adapter_name=name)
    ref.to(device).eval()
    for s, (adapter, _) in prompts.items():
        if adapter is not None:
            ref.set_adapter(adapter)
            wanted[s] = ref_logits(ref, seqs[s])
    # The adapters must matter: otherwise this comparison could not catch a LoRA bug.
    with ref.disable_adapter():
        for s, (adapter, _) in prompts.items():
            if adapter is not None:
                assert (ref_logits(ref, seqs[s]) - wanted[s]).abs().max() > 0.1, s
    return {s: torch.cat(rows[s]) for s in prompts}, wanted


def test_multi_lora_batch_matches_peft(demo):
    got, wanted = run_lora_case(demo, "cpu", torch.float32)
    for s in got:
        assert_logits_close(got[s], wanted[s])


# --- other architectures and RoPE scalings, written by transformers itself ---


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights at O(1) scale (HF's 0.02 init gives near-constant logits that test nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "lm_head" in name:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)


SMALL = dict(
    vocab_size=200,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build_hf(tmp_path: Path, kind: str, seed: int = 0, **overrides):
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    config = cls[0](**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    randomize(model, seed)
    model.save_pretrained(tmp_path)
    return model


def check_against(
    model, model_dir: Path, length: int = 21, chunks: tuple[int, ...] = (8,), attention: str = "auto"
) -> None:
    lm = load_model(model_dir, require_tokenizer=False)
    lm.model.set_attention_backend(attention)
    ids = torch.randint(
        0, lm.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    want = ref_logits(model, ids)
    run = PagedRunner(lm.model, seed=4)
    got, start = [], 0
    for end in [*chunks, length]:
        got.append(run.step([("s", ids[start:end], -1)])["s"])
        start = end
    assert_logits_close(torch.cat(got), want)


def test_qwen2_bias_and_tied_embeddings(tmp_path):
    model = build_hf(tmp_path, "qwen2", tie_word_embeddings=True)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True
    cfg = load_model(tmp_path, require_tokenizer=False).config
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
    check_against(model, tmp_path)


def test_llama_attention_and_mlp_bias(tmp_path):
    model = build_hf(tmp_path, "llama", attention_bias=True, mlp_bias=True, seed=2)
    check_against(model, tmp_path)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
    ids=["llama3", "linear"],
)
def test_rope_scaling_matches(tmp_path, rope):
    model = build_hf(tmp_path, "llama", rope_parameters={**rope, "rope_theta": 500000.0}, seed=1)
    assert load_model(tmp_path, require_tokenizer=False).config.rope_scaling.rope_type == rope["rope_type"]
    check_against(model, tmp_path, length=30, chunks=(5, 17))


def test_dynamic_rope_within_and_past_native_context(tmp_path):
    model = build_hf(
        tmp_path,
        "llama",
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    check_against(model, tmp_path, length=12, chunks=())  # native: default frequencies
    check_against(model, tmp_path, length=24, chunks=())  # NTK-stretched for the 24-token sequence


def test_mistral_sliding_window(tmp_path):
    model = build_hf(tmp_path, "mistral", sliding_window=5, seed=3)
    assert load_model(tmp_path, require_tokenizer=False).config.sliding_window == 5
    check_against(model, tmp_path, length=19, chunks=(3, 11))


# --- The CUDA attention path (fused RoPE + cache write, paged Triton kernels) under the interpreter ---

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="Triton interpreter runs only on CPU-only hosts",
)


@needs_interpreter
def test_triton_attention_prefill_chunks_decode_and_mixed_batch(demo, reference):
    lm = load_model(demo)
    lm.model.set_attention_backend("triton")
    tok = lm.tokenizer
    a = tok.encode("Low-rank adapters add a small update")
    b = tok.encode("def add(a, b): return a + b")
    c = tok.encode("Numbers like 42 and 2024 appear in text")
    run = PagedRunner(lm.model, seed=5)
    first = run.step([("a", a, -1), ("c", c[:5], -1)])
    assert_logits_close(first["a"], ref_logits(reference, a))
    out = run.step([("a", [17], -1), ("b", b, -1), ("c", c[5:], -1)])  # decode + prefill + second chunk
    assert_logits_close(out["a"], ref_logits(reference, [*a, 17])[-1:])
    assert_logits_close(out["b"], ref_logits(reference, b))
    assert_logits_close(out["c"], ref_logits(reference, c)[5:])
    decode = run.step([("a", [5], -1), ("b", [9], -1), ("c", [11], -1)])  # decode-only: the decode kernel
    assert_logits_close(decode["b"], ref_logits(reference, [*b, 9])[-1:])
    assert_logits_close(decode["c"], ref_logits(reference, [*c, 11])[-1:])


@needs_interpreter
def test_triton_attention_sliding_window_and_dynamic_rope(tmp_path):
    mistral = build_hf(tmp_path / "mistral", "mistral", sliding_window=5, seed=3)
    check_against(mistral, tmp_path / "mistral", length=19, chunks=(3, 11), attention="triton")
    dynamic = build_hf(
        tmp_path / "dyn",
        "llama",
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    check_against(dynamic, tmp_path / "dyn", length=24, chunks=(), attention="triton")


# --- GPU ---


@pytest.mark.gpu
def test_bf16_cuda_matches_transformers(demo):
    lm = load_model(demo, device="cuda", dtype="bfloat16")
    ref = transformers.LlamaForCausalLM.from_pretrained(demo, dtype=torch.bfloat16).cuda().eval()
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, once upon a time")
    run = PagedRunner(lm.model, device="cuda", dtype=torch.bfloat16, seed=1)
    got = torch.cat([run.step([("s", prompt[:9], -1)])["s"], run.step([("s", prompt[9:], -1)])["s"]])
    assert_bf16_close(got, ref_logits(ref, prompt))


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * scale)
    # Greedy tokens agree wherever the reference's top-2 gap is clear of bf16 noise.
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.gpu
def test_bf16_cuda_multi_lora_matches_peft(demo):
    got, wanted = run_lora_case(demo, "cuda", torch.bfloat16)
    for s in got:
        assert_bf16_close(got[s], wanted[s])
