"""``make_demo``: a tiny random Llama and PEFT adapters in real Hugging Face layout, no download.

The files are exactly what transformers and PEFT write (config.json, model.safetensors or shards with
an index, generation_config.json, a byte-level BPE tokenizer.json trained with ``tokenizers``,
adapter_config.json + adapter_model.safetensors), so the same directory loads in transformers,
PEFT and the worker. Everything is drawn from one seed. LoRA B matrices are random, not PEFT's zero
init, so an adapter applied wrongly changes the logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
# A ChatML-like chat template with the demo's <s> and </s>, so /v1/chat/completions works on the demo.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A fleet of small models serves many adapters.",
    "Once upon a time there was a little server that batched requests from thousands of users.",
    "Each request asks for a different fine-tune, and the scheduler packs them onto few GPUs.",
    "Low-rank adapters add a small update to every projection: the weight plus B times A.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 appear in text too, as do symbols: +-*/=<>.",
    "Héllo wörld, ça va? Naïve café résumé. Привет мир. 你好世界。 こんにちは。 Emoji: 🙂🚀✨.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n",
    "the the the and and of of to to in in is is it it that that for for on on with with",
)


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()


# Mixed ranks, target subsets (adjacent and not), one rsLoRA, one per-module rank/alpha pattern.
ADAPTER_SPECS: tuple[AdapterSpec, ...] = (
    AdapterSpec(8, 16, ("q_proj", "v_proj")),
    AdapterSpec(4, 8, ALL_PROJ),
    AdapterSpec(16, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), rslora=True),
    AdapterSpec(8, 32, ("gate_proj", "up_proj", "down_proj")),
    AdapterSpec(4, 4, ("o_proj", "down_proj")),
    AdapterSpec(16, 32, ALL_PROJ, rank_pattern=(("down_proj", 4),), alpha_pattern=(("down_proj", 8),)),
    AdapterSpec(8, 8, ("k_proj", "up_proj")),
    AdapterSpec(4, 16, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
)


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    adapters: dict[str, Path]  # adapter name -> its directory


def make_demo(
    out_dir: str | Path,
    *,
    num_adapters: int = 8,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 384,
    max_position_embeddings: int = 512,
    num_shards: int = 1,
    overwrite: bool = False,
    adapter_specs: tuple[AdapterSpec, ...] = ADAPTER_SPECS,
    write_weights: bool = True,
) -> DemoAssets:
    """Write the demo model into ``out_dir`` and ``num_adapters`` adapters under ``out_dir/adapters``.

    ``write_weights=False`` leaves the base weights to the caller (``demo_shapes`` streams large
    ones shard by shard); adapters cycle through ``adapter_specs``.
    """
    if not adapter_specs:
        raise ValueError("adapter_specs must name at least one adapter layout")
    out = Path(out_dir)
    if num_adapters < 0:
        raise ValueError(f"num_adapters must be >= 0, got {num_adapters}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if not overwrite and ((out / "config.json").exists() or (out / "adapters").exists()):
        raise FileExistsError(f"{out}: already holds a model; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[1],
            "pad_token": SPECIAL_TOKENS[2],
            "model_max_length": max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": DEMO_CHAT_TEMPLATE,
        },
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})

    gen = torch.Generator().manual_seed(seed)
    if write_weights:
        _save_weights(out, _base_weights(config, gen), num_shards)

    adapters: dict[str, Path] = {}
    shapes = _proj_shapes(config)
    for i in range(num_adapters):
        name = f"adapter-{i}"
        spec = adapter_specs[i % len(adapter_specs)]
        adapters[name] = _write_adapter(out / "adapters" / name, spec, num_layers, shapes, gen)
    return DemoAssets(out, adapters)


def ensure_chat_template(model_dir: str | Path) -> bool:
    """Add the demo chat template to a demo model made before it had one; True if it was added."""
    path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("chat_template"):
        return False
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return True


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()}")
    return tok


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device) * std


def weight_plan(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Every base tensor in draw order: (name, shape, std, offset); the tensor is offset + N(0, std)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    plan: list[tuple[str, tuple[int, ...], float, float]] = [("model.embed_tokens.weight", (v, h), 1.0, 0.0)]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        plan.append((p + "input_layernorm.weight", (h,), 0.1, 1.0))
        for proj, shape in (
            ("q_proj", (q_out, h)),
            ("k_proj", (kv_out, h)),
            ("v_proj", (kv_out, h)),
            ("o_proj", (h, q_out)),
        ):
            plan.append((f"{p}self_attn.{proj}.weight", shape, shape[1] ** -0.5, 0.0))
        plan.append((p + "post_attention_layernorm.weight", (h,), 0.1, 1.0))
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            plan.append((f"{p}mlp.{proj}.weight", shape, shape[1] ** -0.5, 0.0))
    plan.append(("model.norm.weight", (h,), 0.1, 1.0))
    plan.append(("lm_head.weight", (v, h), 0.4, 0.0))
    return plan


def draw_weight(gen: torch.Generator, shape: tuple[int, ...], std: float, offset: float) -> torch.Tensor:
    tensor = _normal(gen, shape, std)
    return tensor + offset if offset else tensor


def _base_weights(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights scaled so activations stay O(1) and logits are peaked (distinct greedy tokens)."""
    return {name: draw_weight(gen, shape, std, off) for name, shape, std, off in weight_plan(config)}


def _save_weights(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata=meta)
        return
    keys = list(weights)
    per_shard = math.ceil(len(keys) / num_shards)
    weight_map: dict[str, str] = {}
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: weights[k] for k in keys[s * per_shard : (s + 1) * per_shard]}
        save_file(chunk, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _proj_shapes(config: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """proj -> (module path inside a layer, h_in, h_out)."""
    h, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return {
        "q_proj": ("self_attn.q_proj", h, q_out),
        "k_proj": ("self_attn.k_proj", h, kv_out),
        "v_proj": ("self_attn.v_proj", h, kv_out),
        "o_proj": ("self_attn.o_proj", q_out, h),
        "gate_proj": ("mlp.gate_proj", h, i),
        "up_proj": ("mlp.up_proj", h, i),
        "down_proj": ("mlp.down_proj", i, h),
    }


def _write_adapter(
    path: Path,
    spec: AdapterSpec,
    num_layers: int,
    shapes: dict[str, tuple[str, int, int]],
    gen: torch.Generator,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ranks = dict(spec.rank_pattern)
    tensors: dict[str, torch.Tensor] = {}
    for n in range(num_layers):
        for proj in ALL_PROJ:
            if proj not in spec.targets:
                continue
            module, h_in, h_out = shapes[proj]
            r = ranks.get(proj, spec.r)
            prefix = f"base_model.model.model.layers.{n}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = _normal(gen, (r, h_in), h_in**-0.5)
            tensors[f"{prefix}.lora_B.weight"] = _normal(gen, (h_out, r), 0.3 * r**-0.5)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(
        path / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None,
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(spec.targets),
            "bias": "none",
            "use_rslora": spec.rslora,
            "use_dora": False,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
            "inference_mode": True,
            "revision": None,
        },
    )
    return path


def write_random_adapter(
    path: str | Path,
    config: dict[str, Any],
    r: int,
    targets: tuple[str, ...] = ALL_PROJ,
    seed: int = 0,
) -> Path:
    """One PEFT adapter (rank ``r``, alpha ``2r``, random A and B) for a model whose HF
    ``config.json`` fields are ``config``: benchmarks and GPU tests at real model sizes."""
    spec = AdapterSpec(r, 2 * r, tuple(targets))
    gen = torch.Generator().manual_seed(seed)
    return _write_adapter(Path(path), spec, config["num_hidden_layers"], _proj_shapes(config), gen)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
