"""The engine end to end against transformers + PEFT as the oracle.

One mixed batch (base-model requests beside adapters of different ranks, targets, an rsLoRA and a
rank/alpha pattern, prompts of different lengths) goes through the engine at once. Per request the
greedy tokens must equal a greedy run of the PEFT model, and the logits the engine sampled from must
match the oracle's logits on the same context.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lorafleet.worker import Engine, SamplingParams
from lorafleet.worker.demo_assets import make_demo

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# name -> LoraConfig kwargs; B is randomised after creation (PEFT initialises it to zero).
ADAPTERS: dict[str, dict] = {
    "qv-r8": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "all-r4": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "attn-rs16": {
        "r": 16,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "mlp-pattern": {
        "r": 8,
        "lora_alpha": 32,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {"down_proj": 8},
    },
    "regex-r2": {"r": 2, "lora_alpha": 4, "target_modules": r".*\.(k_proj|up_proj)"},
}
MAX_NEW = 8
# (adapter, prompt length) of the mixed batch
REQUESTS = [
    (None, 5),
    ("qv-r8", 17),
    ("all-r4", 3),
    (None, 33),
    ("attn-rs16", 9),
    ("mlp-pattern", 26),
    ("regex-r2", 12),
    ("qv-r8", 6),
]


class LogitSpy:
    """Wraps the engine's model runner to record the logits each request's tokens were sampled from."""

    def __init__(self, run) -> None:
        self.run = run
        self.logits: dict[str, list[torch.Tensor]] = {}

    def __call__(self, plan):
        out = self.run(plan)
        for rid, row in zip(plan.sample_seq_ids, out):
            self.logits.setdefault(rid, []).append(row.detach().float().cpu())
        return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("parity")
    demo = make_demo(root / "model", num_adapters=0, seed=3)
    base = transformers.AutoModelForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    dirs = {}
    for name, kwargs in ADAPTERS.items():
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                # A ~ 1/sqrt(h_in), B ~ 0.3/sqrt(r): a visible but not overwhelming update.
                if "lora_A" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
                elif "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 * p.shape[1] ** -0.5)
        dirs[name] = root / "adapters" / name
        model.save_pretrained(dirs[name])
    return demo.model_dir, dirs


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    # Ids from 3 up: skip the special tokens so no prompt holds EOS.
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for _, n in REQUESTS]


def _oracle(model_dir: Path, adapter_dir: Path | None, device: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return model.to(device).eval()


def _greedy(model, prompt: list[int], n: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    cfg = transformers.GenerationConfig(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt) :].tolist()


def _teacher_forced_logits(model, prompt: list[int], generated: list[int], device: str) -> torch.Tensor:
    """Oracle logits [len(generated), vocab] predicting each generated token from its true context."""
    ids = torch.tensor([prompt + generated[:-1]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().cpu()
    return logits[len(prompt) - 1 :]


def run_mixed_batch(model_dir: Path, adapter_dirs: dict[str, Path], device: str, dtype: str, **tuning):
    engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, **tuning)
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    spy = LogitSpy(engine.runner.run)
    engine.runner.run = spy  # type: ignore[method-assign]
    prompts = _prompts(engine.model_config.vocab_size)
    outs = engine.generate(
        prompts,
        adapters=[a for a, _ in REQUESTS],
        sampling=SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
    )
    engine_logits = [torch.stack(spy.logits[o.request_id]) for o in outs]
    return engine, prompts, outs, engine_logits


def test_mixed_batch_matches_transformers_peft_float32(assets) -> None:
    model_dir, adapter_dirs = assets
    engine, prompts, outs, engine_logits = run_mixed_batch(
        model_dir, adapter_dirs, "cpu", "float32", max_loras=8, max_lora_rank=16
    )
    # Every request ran in the same steps: all prompts prefilled together in step one.
    assert all(len(o.token_ids) == MAX_NEW for o in outs)
    base_logits = None
    for (adapter, _), prompt, out, got in zip(REQUESTS, prompts, outs, engine_logits):
        oracle = _oracle(model_dir, adapter_dirs[adapter] if adapter else None, "cpu")
        expected_tokens = _greedy(oracle, prompt, MAX_NEW, "cpu")
        assert list(out.token_ids) == expected_tokens, f"adapter {adapter}"
        want = _teacher_forced_logits(oracle, prompt, list(out.token_ids), "cpu")
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4, msg=f"adapter {adapter}")
        if adapter is None and base_logits is None:
            base_model = oracle
            base_logits = want
        if adapter is not None:
            # The adapter must matter, or the comparison above proves nothing about LoRA.
            plain = _teacher_forced_logits(base_model, prompt, list(out.token_ids), "cpu")
            assert (plain - want).abs().max() > 1e-2, f"adapter {adapter} has no visible effect"
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks
    assert set(stats.resident_adapters) == set(ADAPTERS)


def _check_low_precision(model_dir, adapter_dirs, device: str, dtype: str) -> None:
    """Greedy tokens equal wherever the float32 oracle's top-2 gap exceeds 0.05, and logits as close
    to the float32 oracle as transformers' own run in the same dtype is (x2, plus a small floor)."""
    _, prompts, outs, engine_logits = run_mixed_batch(
        model_dir, adapter_dirs, device, dtype, max_loras=8, max_lora_rank=16
    )
    for (adapter, _), prompt, out, got in zip(REQUESTS, prompts, outs, engine_logits):
        oracle = _oracle(model_dir, adapter_dirs[adapter] if adapter else None, "cpu")
        want = _teacher_forced_logits(oracle, prompt, list(out.token_ids), "cpu")
        same_dtype = _teacher_forced_logits(
            oracle.to(getattr(torch, dtype)), prompt, list(out.token_ids), "cpu"
        )
        ref_err = (same_dtype - want).abs()
        err = (got - want).abs()
        assert err.max() <= 2 * ref_err.max() + 0.05, f"adapter {adapter}: {err.max()} vs {ref_err.max()}"
        assert err.mean() <= 2 * ref_err.mean() + 0.005, (
            f"adapter {adapter}: {err.mean()} vs {ref_err.mean()}"
        )
        top2 = want.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 0.05
        chosen = torch.tensor(out.token_ids)
        assert torch.equal(chosen[decisive], want.argmax(-1)[decisive]), f"adapter {adapter}"


@pytest.mark.slow
def test_mixed_batch_bfloat16_cpu(assets) -> None:
    model_dir, adapter_dirs = assets
    _check_low_precision(model_dir, adapter_dirs, "cpu", "bfloat16")


@pytest.mark.gpu
def test_mixed_batch_bfloat16_gpu_triton(assets) -> None:
    model_dir, adapter_dirs = assets
    _check_low_precision(model_dir, adapter_dirs, "cuda", "bfloat16")


@pytest.mark.gpu
def test_mixed_batch_float32_gpu(assets) -> None:
    model_dir, adapter_dirs = assets
    _, prompts, outs, engine_logits = run_mixed_batch(
        model_dir, adapter_dirs, "cuda", "float32", max_loras=8, max_lora_rank=16
    )
    for (adapter, _), prompt, out, got in zip(REQUESTS, prompts, outs, engine_logits):
        oracle = _oracle(model_dir, adapter_dirs[adapter] if adapter else None, "cpu")
        want = _teacher_forced_logits(oracle, prompt, list(out.token_ids), "cpu")
        # TF32 may be enabled for matmuls on the GPU, hence the looser bound than on the CPU.
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2, msg=f"adapter {adapter}")
