"""The base model's shape and numerics, parsed from a Hugging Face ``config.json``.

Accepts the Llama family as transformers 4.x and 5.x write it: RoPE settings either as the old
top-level ``rope_theta`` + ``rope_scaling`` or as the newer ``rope_parameters`` dict. Anything we
cannot reproduce exactly (another architecture, another activation, an unsupported RoPE type) is
refused with a ValueError naming the file, never approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency-scaling rule (``rope_type`` as transformers names it)."""

    rope_type: str
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"rope scaling factor must be a positive number, got {self.factor!r}")
        if self.rope_type == "llama3":
            if self.original_max_position_embeddings < 1:
                raise ValueError("llama3 rope scaling needs original_max_position_embeddings >= 1")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the worker needs to know about the base model (immutable, validated)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype, informational
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{where}: architecture {self.architecture!r} is not supported "
                f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"{where}: head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"{where}: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"{where}: rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{where}: sliding_window must be >= 1 or null, got {self.sliding_window!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{where}: {name} {value} outside the vocabulary [0, {self.vocab_size})")
        bad = [t for t in self.eos_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where}: eos_token_id {bad[0]} outside the vocabulary [0, {self.vocab_size})")

    # --- derived sizes ---
    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(h_in, h_out) of every LoRA-targetable projection, as ``LoraSlotPool`` wants them."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    # --- parsing ---
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Parse ``config.json`` and, when present, ``generation_config.json`` of ``model_dir``."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        gen_path = model_dir / "generation_config.json"
        return cls.from_dict(
            read_json(config_path),
            source=str(config_path),
            generation_config=read_json(gen_path) if gen_path.is_file() else None,
        )

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        *,
        source: str = "<dict>",
        generation_config: dict[str, Any] | None = None,
    ) -> ModelConfig:
        """Build from a parsed ``config.json``; ``generation_config`` eos ids take precedence, as in
        transformers' ``generate``."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        p = _Fields(raw, source)
        architecture = _architecture(raw, source)
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"{source}: hidden_act {hidden_act!r} is not supported (only 'silu')")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"{source}: pretraining_tp != 1 is not supported")
        num_heads = p.get_int("num_attention_heads")
        hidden = p.get_int("hidden_size")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % num_heads:
                raise ValueError(f"{source}: hidden_size {hidden} not divisible by num_attention_heads")
            head_dim = hidden // num_heads
        rope_theta, rope_scaling = _rope(raw, source)
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        attention_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        bos = raw.get("bos_token_id")
        pad = raw.get("pad_token_id")
        if generation_config:
            eos = generation_config.get("eos_token_id", eos)
            bos = generation_config.get("bos_token_id", bos)
            pad = generation_config.get("pad_token_id", pad)
        return cls(
            architecture=architecture,
            vocab_size=p.get_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=p.get_int("intermediate_size"),
            num_hidden_layers=p.get_int("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=p.get_int("num_key_value_heads", default=num_heads),
            head_dim=_as_int(head_dim, "head_dim", source),
            max_position_embeddings=p.get_int("max_position_embeddings"),
            rms_norm_eps=p.get_float("rms_norm_eps", default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=_sliding_window(raw, model_type, source),
            bos_token_id=_optional_id(bos, "bos_token_id", source),
            eos_token_ids=_eos_ids(eos, source),
            pad_token_id=_optional_id(pad, "pad_token_id", source),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            source=source,
        )


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file raises FileNotFoundError and bad JSON ValueError, both naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


class _Fields:
    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def get_int(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if value is None:
            raise ValueError(f"{self.source}: missing required field {name!r}")
        return _as_int(value, name, self.source)

    def get_float(self, name: str, default: float) -> float:
        value = self.raw.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.source}: {name} must be a number, got {value!r}")
        return float(value)


def _as_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: {name} must be an integer, got {value!r}")
    return value


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise ValueError(f"{source}: expected one entry in 'architectures', got {archs!r}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})"
            )
        return arch
    model_type = raw.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    raise ValueError(
        f"{source}: unknown model (architectures={archs!r}, model_type={model_type!r}); "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either the transformers-4 or the transformers-5 layout."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
        if "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
        theta = params.get("rope_theta", theta)
        scaling = params
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{source}: rope_theta must be a number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
    try:
        if rope_type == "llama3":
            rs = RopeScaling(
                rope_type,
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        else:
            rs = RopeScaling(rope_type, factor=float(scaling["factor"]))
    except KeyError as exc:
        raise ValueError(f"{source}: {rope_type} rope scaling is missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad {rope_type} rope scaling {scaling!r}: {exc}") from exc
    return float(theta), rs


def _sliding_window(raw: dict[str, Any], model_type: str, source: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2":
        # Qwen2 enables its (per-layer) window only with use_sliding_window, which we do not reproduce.
        if raw.get("use_sliding_window", False):
            raise ValueError(f"{source}: Qwen2 use_sliding_window=true is not supported")
        return None
    if model_type != "mistral" or window is None:
        return None
    return _as_int(window, "sliding_window", source)


def _optional_id(value: Any, name: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):  # some configs store a one-element list
        if len(value) != 1:
            raise ValueError(f"{source}: {name} must be one integer, got {value!r}")
        value = value[0]
    return _as_int(value, name, source)


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(_as_int(v, "eos_token_id", source) for v in items)
