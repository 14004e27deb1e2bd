"""make_shaped_demo: real-shape random checkpoints, sharded and in bf16, tested on the tiny shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.demo_shapes import SHAPES, make_shaped_demo, shard_plan


def _all_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_shard_plan_keeps_order_and_bounds() -> None:
    sizes = [("a", 4), ("b", 4), ("c", 9), ("d", 1), ("e", 3)]
    assert shard_plan(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert shard_plan(sizes, 100) == [["a", "b", "c", "d", "e"]]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        shard_plan(sizes, 0)


def test_tiny_shape_in_float32_has_the_demo_weights_in_shards(tmp_path: Path) -> None:
    make_demo(tmp_path / "demo", num_adapters=0)
    make_shaped_demo(tmp_path / "shaped", "tiny", num_adapters=2, dtype="float32", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "shaped" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    reference, shaped = _all_weights(tmp_path / "demo"), _all_weights(tmp_path / "shaped")
    assert set(index["weight_map"]) == set(shaped) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(shaped[name], tensor), name
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in shaped.values())


def test_bf16_checkpoint_loads_in_the_worker_with_rank16_adapters(tmp_path: Path) -> None:
    from lorafleet.worker import Engine, SamplingParams

    out = tmp_path / "bf16"
    make_shaped_demo(out, "tiny", num_adapters=3, dtype="bfloat16", max_shard_bytes=60_000)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _all_weights(out).values())
    assert (out / "tokenizer.json").is_file()
    for i in range(3):
        config = json.loads((out / "adapters" / f"adapter-{i}" / "adapter_config.json").read_text())
        assert config["r"] == 16 and len(config["target_modules"]) == 7
    engine = Engine.from_pretrained(out, dtype="float32")
    engine.add_adapter("a", out / "adapters" / "adapter-1")
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    outs = engine.generate([[5, 6, 7], [5, 6, 7]], adapters=["a", None], sampling=greedy)
    assert all(len(o.token_ids) == 4 for o in outs)
    assert outs[0].token_ids != outs[1].token_ids, "the adapter must change the output"


def test_bad_inputs_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape 'llama9'"):
        make_shaped_demo(tmp_path / "x", "llama9")
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_shaped_demo(tmp_path / "x", "tiny", dtype="int8")
    with pytest.raises(ValueError, match="adapter_rank must be >= 1"):
        make_shaped_demo(tmp_path / "x", "tiny", adapter_rank=0)


def test_llama2_7b_shape_is_llama2_7b() -> None:
    s = SHAPES["llama2-7b"]
    params = s.vocab_size * s.hidden_size * 2 + s.num_layers * (
        4 * s.hidden_size**2 + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
    )
    assert 6.7e9 < params + s.hidden_size < 6.8e9  # Llama-2-7B: 6.74 B parameters


def test_make_demo_command_with_a_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafleet.cli import main

    out = tmp_path / "cli"
    assert main(["make-demo", str(out), "--shape", "tiny", "--num-adapters", "1", "--max-shard-mb", "1"]) == 0
    assert "shape tiny: num_layers=2" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file() and (out / "adapters" / "adapter-0").is_dir()
    assert main(["make-demo", str(tmp_path / "bad"), "--shape", "llama9"]) == 1
    assert "lorafleet: error: unknown shape 'llama9'" in capsys.readouterr().err
    assert main(["make-demo", str(tmp_path / "bad"), "--shape", "tiny", "--max-shard-mb", "0"]) == 1
    assert "--max-shard-mb must be >= 1" in capsys.readouterr().err


def test_benchmarks_read_the_one_shape_table() -> None:
    import sys
    from pathlib import Path

    from lorafleet.worker.model_config import ModelConfig

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        import engine_shapes
    finally:
        sys.path.pop(0)
    for name in ("llama2-7b", "llama3-8b"):
        config = ModelConfig(**engine_shapes.SHAPES[name])
        shape = SHAPES[name]
        assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (
            shape.num_layers,
            shape.hidden_size,
            shape.num_kv_heads,
        )
        assert config.rope_theta == shape.rope_theta
    assert SHAPES["llama3-8b"].rope_theta == 500000.0 and SHAPES["llama3-8b"].vocab_size == 128256
