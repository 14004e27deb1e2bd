"""PEFT adapter loading/validation, the LoRA slot pool and the adapter cache (LRU, pins, stats)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.worker.adapter_cache import AdapterCache
from lorafleet.worker.adapter_reader import read_packed
from lorafleet.worker.adapters import (
    AdapterFormatError,
    check_file_finite,
    load_adapter,
    validate_adapter_dir,
)
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.lora_pool import PROJECTIONS, LoraSlotPool
from lorafleet.worker.model_config import ModelConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("adapters") / "demo", num_adapters=6, seed=2)


@pytest.fixture(scope="module")
def config(demo) -> ModelConfig:
    return ModelConfig.from_dir(demo.model_dir)


def copy_adapter(demo, name: str, dst: Path) -> Path:
    shutil.copytree(demo.adapters[name], dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def refused(path: Path, config: ModelConfig, match: str) -> None:
    """Both readers (tensors in memory, and straight into the slot layout) refuse ``path`` alike."""
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(path, config)
    pool = LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), 1, 16, torch.float32, "cpu")
    with pytest.raises(AdapterFormatError, match=match):
        read_packed(path, config, pool)


def test_loads_ranks_scales_and_targets(demo, config) -> None:
    # adapter-2: r=16, alpha=16, rsLoRA on attention; adapter-5: rank/alpha pattern on down_proj.
    rs = load_adapter(demo.adapters["adapter-2"], config)
    assert rs.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert rs.projs[(0, "q_proj")].scale == pytest.approx(16 / math.sqrt(16))
    pat = load_adapter(demo.adapters["adapter-5"], config)
    assert pat.projs[(1, "down_proj")].rank == 4 and pat.projs[(1, "down_proj")].scale == pytest.approx(8 / 4)
    assert pat.projs[(1, "up_proj")].rank == 16 and pat.projs[(1, "up_proj")].scale == pytest.approx(32 / 16)
    raw = load_file(str(demo.adapters["adapter-5"] / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(pat.projs[(1, "down_proj")].b, raw[key])
    header_only = validate_adapter_dir(demo.adapters["adapter-5"], config)
    assert header_only.nbytes == pat.nbytes and header_only.projs.keys() == pat.projs.keys()


def test_all_linear_regex_and_exclude(demo, config, tmp_path: Path) -> None:
    path = copy_adapter(demo, "adapter-1", tmp_path / "a")  # all projections
    edit_config(path, target_modules="all-linear")
    assert load_adapter(path, config).target_modules == PROJECTIONS
    edit_config(path, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    assert len(load_adapter(path, config).projs) == 7 * config.num_hidden_layers
    edit_config(path, target_modules="all-linear", exclude_modules=["down_proj"])
    refused(path, config, "down_proj, not in target_modules")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"target_modules": ["q_proj", "foo_proj"]}, "unknown target module 'foo_proj'"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": "(unclosed"}, "regex"),
        ({"r": 0}, "field r"),
        ({"some_future_feature": {"on": True}}, "some_future_feature"),
        ({"r": 3}, "do not match the base model"),
        ({"lora_alpha": 1e38}, "field lora_alpha gives layer .* not finite or above 1024"),
        ({"alpha_pattern": {"q_proj": 1e9}}, "field alpha_pattern gives layer .* q_proj"),
        ({"use_rslora": True, "lora_alpha": 1e6}, r"lora_alpha / sqrt\(r\)"),
    ],
)
def test_refuses_unsupported_configs(demo, config, tmp_path: Path, change, match) -> None:
    path = copy_adapter(demo, "adapter-0", tmp_path / "a")
    edit_config(path, **change)
    refused(path, config, match)
    with pytest.raises(ValueError, match=match):
        validate_adapter_dir(path, config)


def test_refuses_pickles_missing_files_and_bad_tensors(demo, config, tmp_path: Path) -> None:
    path = copy_adapter(demo, "adapter-0", tmp_path / "bin")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    refused(path, config, "arbitrary code")
    refused(tmp_path / "nowhere", config, "is not a directory")
    path = copy_adapter(demo, "adapter-0", tmp_path / "json")
    (path / "adapter_config.json").write_text("{not json")
    refused(path, config, "not valid JSON")
    # Wrong shape: an adapter made for a wider model.
    path = copy_adapter(demo, "adapter-0", tmp_path / "shape")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    refused(path, config, "do not match the base model")
    # DoRA magnitudes and missing halves in the tensor file.
    path = copy_adapter(demo, "adapter-0", tmp_path / "dora")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(8)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    refused(path, config, "DoRA")
    path = copy_adapter(demo, "adapter-0", tmp_path / "half")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    del tensors[next(k for k in tensors if k.endswith("lora_B.weight"))]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    refused(path, config, "lacks lora_B")
    path = copy_adapter(demo, "adapter-0", tmp_path / "nan")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    refused(path, config, "NaN")


def test_scaling_errors_never_echo_the_value(demo, config, tmp_path: Path) -> None:
    """Adapter files are untrusted: the error names the field, not what the file put there."""
    path = copy_adapter(demo, "adapter-0", tmp_path / "a")
    edit_config(path, lora_alpha=123456789.0)
    with pytest.raises(AdapterFormatError) as err:
        validate_adapter_dir(path, config)
    assert "lora_alpha" in str(err.value) and "123456789" not in str(err.value)


def test_weights_for_a_layer_the_model_lacks_name_the_model_depth(demo, config, tmp_path: Path) -> None:
    path = copy_adapter(demo, "adapter-0", tmp_path / "deep")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    far = config.num_hidden_layers + 3
    for key in [k for k in tensors if ".layers.0." in k]:
        tensors[key.replace(".layers.0.", f".layers.{far}.")] = tensors[key].clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    match = f"weights for layer {far}, but the base model has only {config.num_hidden_layers} layers"
    with pytest.raises(AdapterFormatError, match=match):
        validate_adapter_dir(path, config)
    refused(path, config, match)


def test_check_file_finite_names_the_tensor(demo, tmp_path: Path) -> None:
    path = copy_adapter(demo, "adapter-0", tmp_path / "inf")
    check_file_finite(path)  # the demo adapter is fine
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(tensors)[1]
    tensors[key][0, -1] = float("inf")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=f"tensor {key} holds NaN or Inf"):
        check_file_finite(path)


def make_pool(config: ModelConfig, n_slots: int = 2, r_max: int = 16, targets=PROJECTIONS) -> LoraSlotPool:
    return LoraSlotPool(
        config.num_hidden_layers, config.lora_shapes(), n_slots, r_max, torch.float32, "cpu", targets
    )


def test_pool_zero_pads_records_rank_and_clears(demo, config) -> None:
    pool = make_pool(config)
    w = load_adapter(demo.adapters["adapter-0"], config)  # r=8 on q, v
    pool.write_slot(1, w)
    q, k = pool.get(0, "q_proj"), pool.get(0, "k_proj")
    assert q is not None and k is not None
    assert q.ranks.tolist() == [0, 8] and k.ranks.tolist() == [0, 0]
    assert torch.equal(q.a[1, :8], w.projs[(0, "q_proj")].a) and not q.a[1, 8:].any()
    assert torch.equal(q.b[1, :, :8], w.projs[(0, "q_proj")].b) and not q.b[1, :, 8:].any()
    assert q.scales[1] == pytest.approx(w.projs[(0, "q_proj")].scale)
    pool.clear_slot(1)
    assert q.ranks.tolist() == [0, 0] and not q.a.any()
    with pytest.raises(ValueError, match="max_lora_rank"):
        make_pool(config, r_max=4).write_slot(0, w)
    with pytest.raises(ValueError, match="does not hold"):
        make_pool(config, targets=("k_proj",)).write_slot(0, w)
    assert make_pool(config, targets=("k_proj",)).get(0, "q_proj") is None
    with pytest.raises(ValueError, match="slot"):
        pool.write_slot(2, w)


def test_pool_rank_scale_tables_are_views_of_adjacent_slices(demo, config) -> None:
    pool = make_pool(config)
    w = load_adapter(demo.adapters["adapter-0"], config)  # r=8 on q, v
    pool.write_slot(1, w)
    ranks, scales = pool.rank_scale_tables(0, ["q_proj", "k_proj", "v_proj"])
    assert ranks.tolist() == [[0, 8], [0, 0], [0, 8]]
    assert scales[:, 1].tolist() == pytest.approx(
        [w.projs[(0, "q_proj")].scale, 0.0, w.projs[(0, "v_proj")].scale]
    )
    # Adjacent slices come back as views the kernels take without a copy, and see later writes.
    assert ranks.stride(1) == 1 and ranks.data_ptr() == pool.get(0, "q_proj").ranks.data_ptr()
    pool.clear_slot(1)
    assert not ranks.any()
    # Slices that are not adjacent in the pool (a projection between them not targeted) still work.
    sparse = make_pool(config, targets=("q_proj", "v_proj", "o_proj"))
    sparse.write_slot(0, w)
    r_qo, _ = sparse.rank_scale_tables(0, ["q_proj", "o_proj"])
    assert r_qo.tolist() == [[8, 0], [0, 0]]


def test_cache_lru_pins_and_stats(demo, config) -> None:
    pool = make_pool(config, n_slots=2)
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 30, dtype=torch.float32)
    for name, path in demo.adapters.items():
        cache.register(name, path)
    with pytest.raises(KeyError):
        cache.acquire("missing")
    s0 = cache.acquire("adapter-0")
    s1 = cache.acquire("adapter-1")
    assert {s0, s1} == {0, 1} and cache.acquire(None) == -1
    assert not cache.can_acquire("adapter-2")
    with pytest.raises(RuntimeError, match="pinned"):
        cache.acquire("adapter-2")
    cache.release("adapter-0")
    assert cache.can_acquire("adapter-2")
    assert cache.acquire("adapter-2") == s0  # evicted the unpinned adapter-0
    assert cache.slot_of("adapter-0") is None and cache.slot_of("adapter-1") == s1
    assert cache.acquire("adapter-1") == s1  # a hit
    assert (cache.hits, cache.misses, cache.loads) == (1, 3, 3)
    cache.release("adapter-2")
    cache.acquire("adapter-0")  # back from the host cache: no disk read
    assert cache.loads == 3 and cache.host_hits == 1
    with pytest.raises(ValueError, match="in use"):
        cache.unregister("adapter-1")
    with pytest.raises(ValueError, match="released more often"):
        cache.release("adapter-3")
    assert len(cache.take_load_seconds()) == 4 and cache.take_load_seconds() == ()


def test_host_cache_respects_byte_budget(demo, config) -> None:
    pool = make_pool(config, n_slots=1)
    # The host tier holds packed adapters: padded to r_max, plus the rank and scale tables.
    one = pool.pack(load_adapter(demo.adapters["adapter-1"], config)).nbytes
    assert one == pool.packed_nbytes > load_adapter(demo.adapters["adapter-0"], config).nbytes
    cache = AdapterCache(config, pool, host_cache_bytes=one, dtype=torch.float32)
    for name, path in demo.adapters.items():
        cache.register(name, path)
    for name in ("adapter-1", "adapter-0", "adapter-1"):
        cache.acquire(name)
        cache.release(name)
    # adapter-1 alone fills the budget, so reading adapter-0 pushed it out: three disk reads.
    assert cache.loads == 3
    with pytest.raises(ValueError, match="max_lora_rank"):
        AdapterCache(config, make_pool(config, r_max=4), host_cache_bytes=0, dtype=torch.float32).register(
            "big", demo.adapters["adapter-2"]
        )


def pool_state(pool: LoraSlotPool) -> list[torch.Tensor]:
    out = [pool._ranks.clone(), pool._scales.clone()]
    for layer in range(pool.num_layers):
        for proj in pool.target_modules:
            pl = pool.get(layer, proj)
            assert pl is not None
            out += [pl.a.clone(), pl.b.clone()]
    return out


@pytest.mark.parametrize("targets", [PROJECTIONS, ("q_proj", "v_proj", "o_proj", "down_proj")])
def test_packed_upload_writes_exactly_what_write_slot_writes(demo, config, targets) -> None:
    # Mixed ranks (4/8/16, a per-module rank pattern), projections an adapter skips, rsLoRA; every
    # slot is overwritten by a different adapter so stale padding or ranks would show.
    ref, fast = make_pool(config, n_slots=3, targets=targets), make_pool(config, n_slots=3, targets=targets)
    names = [
        n for n in demo.adapters if set(load_adapter(demo.adapters[n], config).target_modules) <= set(targets)
    ]
    assert len(names) >= 2 and any(load_adapter(demo.adapters[n], config).use_rslora for n in names) == (
        "k_proj" in targets
    )
    for i, name in enumerate(names + names[::-1]):
        w = load_adapter(demo.adapters[name], config)
        slot = i % 3
        ref.write_slot(slot, w)
        packed = fast.pack(w)
        assert packed.nbytes == fast.packed_nbytes and packed.name == w.name
        fast.write_packed(slot, packed)
        for r, f in zip(pool_state(ref), pool_state(fast), strict=True):
            assert torch.equal(r, f), name
    fast.clear_slot(0)
    ref.clear_slot(0)
    assert all(torch.equal(r, f) for r, f in zip(pool_state(ref), pool_state(fast)))
    # The rank/scale tables keep being the views the kernels read (same storage after uploads).
    ranks, _ = fast.rank_scale_tables(1, ["q_proj"])
    assert ranks.data_ptr() == fast.get(1, "q_proj").ranks.data_ptr() == fast._ranks[1, 0].data_ptr()


def test_packed_buffer_layout_and_foreign_pools(demo, config) -> None:
    pool = make_pool(config, n_slots=2, r_max=16)
    w = load_adapter(demo.adapters["adapter-0"], config)  # r=8 on q, v only
    packed = pool.pack(w)
    flat, ranks, scales = pool.views(packed.buffer)
    h_in, h_out = pool.shapes["q_proj"]
    a = flat[: 16 * h_in].view(16, h_in)  # layer 0 q_proj A comes first, padded to r_max rows
    assert torch.equal(a[:8], w.projs[(0, "q_proj")].a) and not a[8:].any()
    b = flat[16 * h_in : 16 * (h_in + h_out)].view(h_out, 16)
    assert torch.equal(b[:, :8], w.projs[(0, "q_proj")].b) and not b[:, 8:].any()
    assert ranks[0].tolist() == [8, 0, 8, 0, 0, 0, 0]
    assert scales[0, 0].item() == pytest.approx(w.projs[(0, "q_proj")].scale) and scales[0, 1] == 0
    with pytest.raises(ValueError, match="another layout"):
        make_pool(config, r_max=8).write_packed(0, packed)
    with pytest.raises(ValueError, match="max_lora_rank"):
        make_pool(config, r_max=4).pack(w)
    with pytest.raises(ValueError, match="slot"):
        pool.write_packed(2, packed)
