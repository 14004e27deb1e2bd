"""Random checkpoints of real model shapes (`lorafleet make-demo --shape llama2-7b DIR`) for benchmarks.

A 7B model does not fit in memory as float32 next to its own copy, so the weights are drawn in the
same order as the tiny demo's (`weight_plan`), converted to the target dtype one tensor at a time,
and written shard by shard (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`,
the layout transformers writes). Config, tokenizer and PEFT adapters come from `make_demo`, so the
folder loads in the worker, transformers and PEFT like the tiny demo does. Benchmark adapters are
uniform: rank `adapter_rank` on every projection.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.worker.demo_assets import (
    ALL_PROJ,
    AdapterSpec,
    DemoAssets,
    draw_weight,
    make_demo,
    weight_plan,
)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def config_dict(self) -> dict[str, object]:
        """The shape as ``ModelConfig`` fields (what the benchmarks build random models from)."""
        return {
            "architecture": "LlamaForCausalLM",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
        }


# The one table of model shapes: make-demo, the engine, attention and fleet benchmarks read it.
SHAPES: dict[str, ModelShape] = {
    # The tiny demo (tests, CPU); Llama-2-7B and Llama-3-8B (their Hugging Face config.json).
    "tiny": ModelShape(2, 64, 128, 4, 2, 384, 512),
    "llama2-7b": ModelShape(32, 4096, 11008, 32, 32, 32000, 4096),
    "llama3-8b": ModelShape(32, 4096, 14336, 32, 8, 128256, 8192, rope_theta=500000.0),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most max_shard_bytes (one tensor may exceed)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def make_shaped_demo(
    out_dir: str | Path,
    shape: str,
    *,
    num_adapters: int = 8,
    adapter_rank: int = 16,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "cpu",
) -> DemoAssets:
    """A random `shape` model in `dtype` as sharded safetensors, a tokenizer, rank-r adapters.

    ``device`` draws the base weights there: "cuda" makes a 7B model in seconds instead of minutes
    of single-threaded CPU sampling, with other (equally random) values than the CPU's.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if adapter_rank < 1:
        raise ValueError(f"adapter_rank must be >= 1, got {adapter_rank}")
    s = SHAPES[shape]
    spec = AdapterSpec(adapter_rank, 2.0 * adapter_rank, ALL_PROJ)
    # make_demo writes config, tokenizer and adapters; its base weights are a 0-layer stub that the
    # sharded writer below replaces (so nothing of the full model is ever held twice).
    assets = make_demo(
        out_dir,
        num_adapters=num_adapters,
        seed=seed,
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        vocab_size=s.vocab_size,
        max_position_embeddings=s.max_position_embeddings,
        adapter_specs=(spec,),
        write_weights=False,
        overwrite=overwrite,
    )
    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = dtype
    config["rope_theta"] = s.rope_theta
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_sharded(out, config, DTYPES[dtype], max_shard_bytes, seed, torch.device(device))
    return assets


def _write_sharded(
    out: Path, config: dict, dtype: torch.dtype, max_shard_bytes: int, seed: int, device: torch.device
) -> None:
    plan = weight_plan(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(name, math.prod(shape) * itemsize) for name, shape, _, _ in plan]
    shards = shard_plan(sizes, max_shard_bytes)
    by_name = {name: (shape, std, off) for name, shape, std, off in plan}
    # The tiny demo's draw order: on the CPU, the same seed gives the same weights.
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        chunk = {name: draw_weight(gen, *by_name[name]).to(dtype).cpu() for name in names}
        save_file(chunk, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del chunk
    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def describe(shape: str) -> str:
    """One line naming the shape's dimensions (what `make-demo --shape` prints)."""
    return ", ".join(f"{k}={v}" for k, v in asdict(SHAPES[shape]).items())
