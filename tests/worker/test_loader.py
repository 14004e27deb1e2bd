"""load_model: single and sharded safetensors, dtypes, and a clear error for every broken file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.loader import load_model


@pytest.fixture(scope="module")
def demo_src(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo"), num_adapters=0, seed=1).model_dir


@pytest.fixture
def demo(demo_src, tmp_path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(demo_src, tmp_path / "model"))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loads_weights_config_tokenizer(demo):
    lm = load_model(demo)
    assert lm.config.architecture == "LlamaForCausalLM"
    assert lm.generation_config["eos_token_id"] == 1 and lm.config.eos_token_ids == (1,)
    assert lm.tokenizer is not None and lm.tokenizer.eos_token_id == 1 and lm.tokenizer.bos_token_id == 0
    raw = load_file(str(demo / "model.safetensors"))
    layer = lm.model.layers[1]
    q, k, v = (raw[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(layer.qkv_proj.weight, torch.cat([q, k, v]))
    gate, up = (raw[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj"))
    assert torch.equal(layer.gate_up_proj.weight, torch.cat([gate, up]))
    assert torch.equal(lm.model.lm_head, raw["lm_head.weight"])
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_sharded_checkpoint_with_index_matches_single_file(demo_src, tmp_path):
    sharded = make_demo(tmp_path / "sharded", num_adapters=0, seed=1, num_shards=3).model_dir
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    a, b = params(load_model(demo_src).model), params(load_model(sharded).model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16])
def test_dtype_option(demo, dtype):
    lm = load_model(demo, dtype=dtype)
    assert all(
        p.dtype == (getattr(torch, dtype) if isinstance(dtype, str) else dtype) for p in lm.model.parameters()
    )


def test_bad_dtype(demo):
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(demo, dtype="int8")


def test_pickle_only_checkpoint_refused(demo):
    (demo / "model.safetensors").rename(demo / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refusing to load a pickle checkpoint"):
        load_model(demo)


def test_no_weights_at_all(demo):
    (demo / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_model(demo)


def test_missing_directory_and_config(tmp_path, demo):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (demo / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(demo / "config.json"))):
        load_model(demo)


def test_corrupt_safetensors_names_file(demo):
    path = demo / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable safetensors file"):
        load_model(demo)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(demo)


def test_missing_shard_names_file(tmp_path):
    model_dir = make_demo(tmp_path / "m", num_adapters=0, num_shards=2).model_dir
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        load_model(model_dir)


def test_bad_index(demo):
    (demo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ValueError, match=r"index\.json: missing or empty 'weight_map'"):
        load_model(demo)


def _rewrite(demo: Path, edit) -> None:
    path = demo / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(demo):
    _rewrite(demo, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(demo)


def test_misshapen_tensor(demo):
    _rewrite(demo, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\), expected \(64,\)"):
        load_model(demo)


def test_unexpected_tensor_means_wrong_config(demo):
    _rewrite(demo, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(ValueError, match="does not use"):
        load_model(demo)


def test_ignorable_rotary_buffer_accepted(demo):
    _rewrite(demo, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(demo)


def test_tokenizer_required_unless_waived(demo):
    (demo / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_model(demo)
    assert load_model(demo, require_tokenizer=False).tokenizer is None


def test_corrupt_tokenizer(demo):
    (demo / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_model(demo)
