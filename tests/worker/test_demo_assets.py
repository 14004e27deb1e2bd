"""make_demo writes real HF/PEFT layouts: transformers, PEFT and the worker all load them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.worker.demo_assets import ADAPTER_SPECS, make_demo
from lorafleet.worker.loader import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), num_adapters=8, seed=0)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_seed(demo, tmp_path):
    again = make_demo(tmp_path / "again", num_adapters=8, seed=0)
    assert tree(demo.model_dir) == tree(again.model_dir)
    other = make_demo(tmp_path / "other", num_adapters=8, seed=1)
    a, b = tree(demo.model_dir), tree(other.model_dir)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_layout(demo):
    d = demo.model_dir
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (d / name).is_file(), name
    assert sorted(demo.adapters) == [f"adapter-{i}" for i in range(8)]
    for path in demo.adapters.values():
        assert path.parent == d / "adapters"
        assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    weights = load_file(str(d / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights and "model.layers.1.self_attn.q_proj.weight" in weights
    keys = load_file(str(demo.adapters["adapter-0"] / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_adapters_are_mixed(demo):
    ranks, targets, rslora, nonzero_b = set(), set(), 0, True
    for path in demo.adapters.values():
        cfg = json.loads((path / "adapter_config.json").read_text())
        ranks.add(cfg["r"])
        targets.add(tuple(cfg["target_modules"]))
        rslora += cfg["use_rslora"]
        for key, t in load_file(str(path / "adapter_model.safetensors")).items():
            if "lora_B" in key:
                nonzero_b &= bool(t.abs().max() > 0)
    assert ranks == {4, 8, 16} and len(targets) == 7 and rslora == 1 and nonzero_b


def test_transformers_loads_model_and_tokenizer(demo):
    d = demo.model_dir
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 384
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    lm = load_model(d)
    text = "Hello wörld, the quick brown fox 🙂 def add(a, b):"
    ids = lm.tokenizer.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == lm.tokenizer.decode(ids) == text
    assert hf_tok.eos_token_id == lm.tokenizer.eos_token_id == lm.config.eos_token_ids[0]


def test_peft_loads_every_adapter_exactly(demo):
    base = transformers.LlamaForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([load_model(demo.model_dir).tokenizer.encode("Once upon a time")])
    with torch.no_grad():
        base_logits = base(ids).logits
    names = list(demo.adapters)
    model = peft.PeftModel.from_pretrained(base, demo.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(demo.adapters[name], adapter_name=name)
    layers = model.base_model.model.model.layers
    for i, name in enumerate(names):
        spec = ADAPTER_SPECS[i]
        tensors = load_file(str(demo.adapters[name] / "adapter_model.safetensors"))
        for key, t in tensors.items():
            # base_model.model.model.layers.N.<block>.<proj>.lora_X.weight
            parts = key.split(".")
            module = getattr(getattr(layers[int(parts[4])], parts[5]), parts[6])
            loaded = getattr(module, parts[7])[name].weight
            assert torch.equal(loaded, t), key
        q = layers[0].self_attn.q_proj
        if "q_proj" in spec.targets:
            r = q.r[name]
            want = spec.alpha / (r**0.5 if spec.rslora else r)
            assert q.scaling[name] == pytest.approx(want)
        model.set_adapter(name)
        with torch.no_grad():
            assert (model(ids).logits - base_logits).abs().max() > 0.1, name
    down = layers[0].mlp.down_proj
    assert down.r["adapter-5"] == 4 and down.scaling["adapter-5"] == pytest.approx(8 / 4)


def test_refuses_to_overwrite(demo, tmp_path):
    with pytest.raises(FileExistsError, match="already holds a model"):
        make_demo(demo.model_dir)
    out = make_demo(tmp_path / "x", num_adapters=1)
    make_demo(out.model_dir, num_adapters=1, seed=5, overwrite=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_adapters"):
        make_demo(tmp_path / "a", num_adapters=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        make_demo(tmp_path / "b", vocab_size=100)
