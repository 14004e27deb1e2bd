"""ModelConfig parsing of real-world config.json layouts, and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorafleet.worker.kv_cache import KVCache
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.rope import base_inv_freq, scaled_inv_freq

# As in Meta-Llama-3.1-8B's config.json (transformers 4.x layout).
LLAMA31 = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
MISTRAL = {
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write(tmp_path: Path, config: dict, generation: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_llama31_with_llama3_rope(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, LLAMA31))
    assert cfg.architecture == "LlamaForCausalLM" and cfg.model_type == "llama"
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size, cfg.num_queries_per_kv) == (128, 4096, 1024, 4)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is not None
    assert (
        cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 8192
    )
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.tie_word_embeddings) and cfg.sliding_window is None
    assert cfg.lora_shapes()["k_proj"] == (4096, 1024) and cfg.lora_shapes()["down_proj"] == (14336, 4096)


def test_qwen2_has_qkv_bias_tied_and_no_window(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, QWEN2))
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
    assert cfg.head_dim == 64 and cfg.sliding_window is None and cfg.rope_scaling is None


def test_mistral_sliding_window(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, MISTRAL))
    assert cfg.sliding_window == 4096 and cfg.model_type == "mistral"


def test_generation_config_eos_wins(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, MISTRAL, {"eos_token_id": [2, 7], "bos_token_id": 1}))
    assert cfg.eos_token_ids == (2, 7)


def test_transformers5_rope_parameters_layout(tmp_path):
    raw = {k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}
    cfg = ModelConfig.from_dir(write(tmp_path, raw))
    assert (
        cfg.rope_theta == 1234.0 and cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2
    )
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 99.0}
    cfg = ModelConfig.from_dir(write(tmp_path, raw))
    assert cfg.rope_theta == 99.0 and cfg.rope_scaling is None


def test_old_style_type_key_and_dynamic(tmp_path):
    raw = dict(MISTRAL, rope_scaling={"type": "dynamic", "factor": 2.0})
    cfg = ModelConfig.from_dir(write(tmp_path, raw))
    assert cfg.rope_scaling.rope_type == "dynamic"
    # Within the native context dynamic NTK keeps the default frequencies.
    torch.testing.assert_close(scaled_inv_freq(cfg), base_inv_freq(cfg.rope_theta, cfg.head_dim))


def test_llama3_inv_freq_bands(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, LLAMA31))
    base = base_inv_freq(cfg.rope_theta, cfg.head_dim)
    scaled = scaled_inv_freq(cfg)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4  # short wavelengths untouched
    low = wavelen > 8192 / 1  # long ones divided by the factor
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert mid.any() and bool(((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8)).all())


def test_explicit_head_dim(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, dict(MISTRAL, head_dim=64)))
    assert cfg.head_dim == 64 and cfg.q_size == 2048


def test_model_type_fallback_without_architectures(tmp_path):
    raw = {k: v for k, v in MISTRAL.items() if k != "architectures"}
    assert ModelConfig.from_dir(write(tmp_path, raw)).architecture == "MistralForCausalLM"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": None, "model_type": "gpt2"}, "unknown model"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": "32"}, "num_hidden_layers"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1.0}}, "factor"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"eos_token_id": 999999}, "eos_token_id"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, change, message):
    raw = dict(MISTRAL)
    for k, v in change.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    if change.get("architectures", 0) is None:
        raw["model_type"] = change["model_type"]
    with pytest.raises(ValueError, match=message) as exc:
        ModelConfig.from_dir(write(tmp_path, raw))
    assert str(tmp_path / "config.json") in str(exc.value)


def test_missing_and_corrupt_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_qwen2_sliding_window_refused(tmp_path):
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_dir(write(tmp_path, dict(QWEN2, use_sliding_window=True)))


def test_config_is_frozen_and_validated():
    cfg = ModelConfig.from_dict(MISTRAL)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="head_dim must be even"):
        ModelConfig.from_dict(dict(MISTRAL, head_dim=63))


def test_kv_cache_sizes():
    cfg = ModelConfig.from_dict(LLAMA31)
    # 32 layers * 2 (K, V) * 16 tokens * 8 heads * 128 dims * 2 bytes
    assert KVCache.bytes_per_block(cfg, 16, "bfloat16") == 32 * 2 * 16 * 8 * 128 * 2
    assert KVCache.bytes_per_block(cfg, 16, torch.float32) == 2 * KVCache.bytes_per_block(cfg, 16, "float16")
    per_block = KVCache.bytes_per_block(cfg, 16, "bfloat16")
    assert KVCache.num_blocks_for_budget(cfg, 16, "bfloat16", 10 * per_block + 5) == 10
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.num_blocks_for_budget(cfg, 16, "bfloat16", per_block - 1)
    with pytest.raises(ValueError, match="dtype"):
        KVCache.bytes_per_block(cfg, 16, "int8")


def test_kv_cache_tensors():
    small = dict(MISTRAL, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    cfg = ModelConfig.from_dict(small)
    kv = KVCache(cfg, num_blocks=5, block_size=4, dtype="float16", device="cpu")
    assert len(kv.k) == len(kv.v) == 3
    assert kv.k[0].shape == (5, 4, 2, 16) and kv.v[2].dtype == torch.float16
    assert kv.nbytes == 5 * KVCache.bytes_per_block(cfg, 4, "float16") and kv.num_slots == 20
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache(cfg, num_blocks=0, block_size=4, dtype="float16", device="cpu")
