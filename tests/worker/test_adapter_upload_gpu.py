"""Packed adapter uploads on CUDA: the Triton scatter, exactness against ``write_slot``, stream
ordering (a reused slot is not overwritten under queued readers) and loads off the main thread."""

from __future__ import annotations

import threading

import pytest
import torch

import lorafleet.worker.adapter_cache as adapter_cache_module
from lorafleet.kernels.slot_scatter import make_plan, slot_scatter
from lorafleet.worker.adapter_cache import AdapterCache
from lorafleet.worker.adapters import load_adapter
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.lora_pool import PROJECTIONS, LoraSlotPool
from lorafleet.worker.model_config import ModelConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("upload_gpu") / "demo", num_adapters=6, seed=4)


@pytest.fixture(scope="module")
def config(demo) -> ModelConfig:
    return ModelConfig.from_dir(demo.model_dir)


def make_pool(
    config: ModelConfig, n_slots: int = 3, targets=PROJECTIONS, dtype=torch.bfloat16
) -> LoraSlotPool:
    return LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), n_slots, 16, dtype, "cuda", targets)


def pool_state(pool: LoraSlotPool) -> list[torch.Tensor]:
    out = [pool._ranks.cpu(), pool._scales.cpu()]
    for layer in range(pool.num_layers):
        for proj in pool.target_modules:
            pl = pool.get(layer, proj)
            out += [pl.a.cpu(), pl.b.cpu()]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_scatter_matches_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    stacks = [torch.zeros(4, n, dtype=dtype, device="cuda") for n in (1, 4095, 4096, 4097, 100_000, 7)]
    ref = [torch.zeros_like(s) for s in stacks]
    total = sum(s.shape[1] for s in stacks)
    src = torch.randn(total, generator=gen, device="cuda").to(dtype)
    slot_scatter(src, make_plan([s[2] for s in stacks]), backend="triton")
    slot_scatter(src, make_plan([s[2] for s in ref]), backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(stacks, ref))
    assert all(not s[[0, 1, 3]].any() for s in stacks)


@pytest.mark.parametrize("targets", [PROJECTIONS, ("q_proj", "v_proj", "o_proj", "down_proj")])
def test_packed_upload_equals_write_slot_on_cuda(demo, config, targets) -> None:
    ref, fast = make_pool(config, targets=targets), make_pool(config, targets=targets)
    names = [
        n for n in demo.adapters if set(load_adapter(demo.adapters[n], config).target_modules) <= set(targets)
    ]
    stream = torch.cuda.Stream()
    for i, name in enumerate(names + names[::-1]):
        w = load_adapter(demo.adapters[name], config, dtype=torch.bfloat16)
        ref.write_slot(i % 3, w)
        packed = fast.pack(w, pin=True)
        assert packed.buffer.is_pinned()
        with torch.cuda.stream(stream):
            fast.write_packed(i % 3, packed, non_blocking=True)
        stream.synchronize()
        for r, f in zip(pool_state(ref), pool_state(fast), strict=True):
            assert torch.equal(r, f), name


def test_reused_slot_waits_for_queued_readers_and_step_waits_for_upload(demo, config) -> None:
    pool = make_pool(config, n_slots=1)
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 30, dtype=torch.bfloat16)
    assert cache.background_loads  # the CUDA default
    for name, path in demo.adapters.items():
        cache.register(name, path)
    slot = cache.acquire("adapter-1")  # all projections
    torch.cuda.synchronize()
    q = pool.get(0, "q_proj")
    old = q.a[slot].clone()
    cache.release("adapter-1")
    # A reader queued behind a long kernel on the main stream, then an upload into the same slot:
    # the side stream must wait for the reader, or the reader would see the new adapter.
    torch.cuda._sleep(200_000_000)
    seen = q.a[slot].clone()
    assert cache.acquire("adapter-3") == slot  # evicts adapter-1, uploads on the side stream
    cache.wait_for(["adapter-3"])
    after = q.a[slot].clone()  # ordered after the upload by wait_for
    torch.cuda.synchronize()
    assert torch.equal(seen, old)
    w = load_adapter(demo.adapters["adapter-3"], config, dtype=torch.bfloat16)
    pw = w.projs.get((0, "q_proj"))
    expect = torch.zeros_like(old.cpu())
    if pw is not None:
        expect[: pw.rank] = pw.a
    assert torch.equal(after.cpu(), expect)
    assert len(cache.take_load_seconds()) == 2
    cache.close()


def test_background_load_on_cuda_runs_off_the_main_thread(demo, config, monkeypatch) -> None:
    threads: list[str] = []
    real = adapter_cache_module.read_packed

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_cache_module, "read_packed", spy)
    pool = make_pool(config, n_slots=2)
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 30, dtype=torch.bfloat16)
    cache.register("a", demo.adapters["adapter-1"])
    assert not cache.can_acquire("a")
    while cache.loading():
        cache.wait_for_loads(1.0)
    assert cache.can_acquire("a") and cache.acquire("a") == 0
    assert threads and threads[0].startswith("adapter-loader")
    ref = make_pool(config, n_slots=2)
    ref.write_slot(0, load_adapter(demo.adapters["adapter-1"], config, dtype=torch.bfloat16))
    cache.wait_for(["a"])
    torch.cuda.synchronize()
    assert all(torch.equal(r, f) for r, f in zip(pool_state(ref), pool_state(pool)))
    cache.close()


def test_an_upload_evicted_before_it_finished_is_still_timed(demo, config) -> None:
    """With overlapped stepping the host may evict an adapter whose upload is still queued on the
    device; the upload's time must still be reported (the profiler's reload sweep relies on it)."""
    pool = make_pool(config, n_slots=1)
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 30, dtype=torch.bfloat16)
    for name, path in demo.adapters.items():
        cache.register(name, path)
    cache.acquire("adapter-1")
    cache.release("adapter-1")
    cache.take_load_seconds()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the uploads below queue behind this on the side stream
    cache.acquire("adapter-3")  # a host-cache miss: a disk read, then an upload
    cache.release("adapter-3")
    cache.acquire("adapter-1")  # evicts adapter-3 while its upload still waits for the sleep
    cache.release("adapter-1")
    torch.cuda.synchronize()
    assert len(cache.take_load_seconds()) == 2
    assert cache.bookkeeping_sizes()["evicted_pending_uploads"] == 0
    cache.close()


def test_pinned_buffers_reserved_at_start_serve_the_loads(demo, config) -> None:
    pool = make_pool(config)
    cache = AdapterCache(config, pool, host_cache_bytes=2 * pool.packed_nbytes, dtype=torch.bfloat16)
    assert cache.reserve_pinned_buffers() == 3  # two host-cache entries + the load in flight
    for name in ("adapter-1", "adapter-2", "adapter-3"):
        cache.register(name, demo.adapters[name])
        slot = cache.acquire(name)  # a synchronous load into a reserved buffer, then the upload
        cache.wait_for([name])
        cache.release(name)
        assert slot >= 0
    torch.cuda.synchronize()
    cache.close()
