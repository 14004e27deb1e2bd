"""Adapter loading on a Llama-2-7B shape (32 layers, hidden 4096, intermediate 11008), r16 on all
seven projections (80 MB per adapter in bf16):

(a) host -> GPU: an upload through ``AdapterCache`` (packed adapter in pinned memory: one
    host-to-device copy + one scatter launch + two table copies) against a plain pinned ``copy_`` of
    the same bytes in the same run, and against the per-projection ``write_slot`` path it replaced;
(b) disk (page cache warm) -> packed host buffer through ``read_packed``, per stage (parse and
    validate the header, allocate, plan and zero the padding, read, convert, finite check), for a
    file in the pool's dtype and a float32 one (as PEFT often saves), against the reference path
    (``load_adapter`` + ``pack`` + a float32 sum);
(b') how a load on another thread stalls a stand-in step loop on this one (Python's global lock;
    ``gil_stall.py``), for ``read_packed`` and for the reference path;
(b'') a cold load from disk to the slot, per phase, and end to end through the cache's loader thread;
(c) a timeline: an engine (random bf16 weights) keeps stepping a batch of decoding sequences while
    a new request's adapter loads from disk: every step's wall time, the load's start and end.

Weights are random (no checkpoint, no download); adapters are written as real PEFT directories.

    python3 benchmarks/bench_adapter_load.py [--out DIR]                   # GPU: every part
    python3 benchmarks/bench_adapter_load.py --device cpu --reps 10        # CPU: (b) and (b') only
    python3 benchmarks/bench_adapter_load.py --tiny --device cpu   # seconds-long smoke run of the logic
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gil_stall
import torch
from engine_shapes import SHAPES, random_model
from safetensors.torch import save_file

from lorafleet.worker import Engine, EngineConfig, Request, SamplingParams
from lorafleet.worker.adapter_cache import AdapterCache
from lorafleet.worker.adapter_reader import init_loader_thread, read_packed
from lorafleet.worker.adapters import load_adapter, module_key
from lorafleet.worker.loader import LoadedModel
from lorafleet.worker.lora_pool import PROJECTIONS, LoraSlotPool, PackedAdapter
from lorafleet.worker.model_config import ModelConfig

LLAMA2_7B: dict[str, Any] = SHAPES["llama2-7b"]
# Same structure, tiny: for the CPU smoke run (checks the logic, not the numbers).
TINY = {**LLAMA2_7B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=4, head_dim=16)
RANK = 16
PROMPT_LEN = 32


def write_adapter(path: Path, config: ModelConfig, seed: int, dtype: torch.dtype) -> Path:
    """A PEFT adapter directory, r16 on all seven projections, tensors stored in ``dtype``."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = config.lora_shapes()
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj in PROJECTIONS:
            h_in, h_out = shapes[proj]
            key = f"base_model.model.{module_key(layer, proj)}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, h_in, generator=gen) * h_in**-0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(h_out, RANK, generator=gen) * 0.3 * RANK**-0.5).to(
                dtype
            )
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(PROJECTIONS)}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def timed(fn: Any, device: str) -> float:
    """Wall seconds of ``fn()`` including the device work it queued."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_pool(config: ModelConfig, dtype: torch.dtype, device: str, n_slots: int = 1) -> LoraSlotPool:
    return LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), n_slots, RANK, dtype, device)


def bench_upload(config: ModelConfig, dirs: list[Path], dtype: torch.dtype, device: str, reps: int) -> dict:
    """(a) Host cache -> slot: the cache's packed upload vs a pinned copy of the same bytes."""
    cuda = device.startswith("cuda")
    pool = make_pool(config, dtype, device)  # one slot: every acquire of the other adapter uploads
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 40, dtype=dtype)
    names = ["up-0", "up-1"]
    for name, path in zip(names, dirs):
        cache.register(name, path)
        cache.acquire(name)  # the first acquire reads the disk; later ones come from host memory
        cache.release(name)
    sync(device)
    cache.take_load_seconds()
    walls = []
    for i in range(reps + 2):  # two warm-ups
        name = names[i % 2]

        def upload(name: str = name) -> None:
            cache.acquire(name)

        wall = timed(upload, device)
        cache.release(name)
        if i >= 2:
            walls.append(wall)
    device_times = list(cache.take_load_seconds())[2:]  # event-timed on CUDA (issue excluded)
    nbytes = pool.packed_nbytes
    src = (
        torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory()
        if cuda
        else torch.zeros(nbytes, dtype=torch.uint8)
    )
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy_walls = [timed(lambda: dst.copy_(src, non_blocking=True), device) for _ in range(reps + 2)][2:]
    # The per-projection path this replaced (~6 small operations per layer and projection).
    w = load_adapter(dirs[0], config, dtype=dtype)
    if cuda:
        for pw in w.projs.values():
            pw.a, pw.b = pw.a.pin_memory(), pw.b.pin_memory()
    ref_pool = make_pool(config, dtype, device)
    slot_walls = [
        timed(lambda: ref_pool.write_slot(0, w, non_blocking=True), device) for _ in range(reps + 2)
    ][2:]
    med = statistics.median
    out = {
        "bytes": nbytes,
        "cache_upload_wall_ms": ms(med(walls)),
        "cache_upload_device_ms": ms(med(device_times)) if device_times else None,
        "pinned_copy_wall_ms": ms(med(copy_walls)),
        "write_slot_wall_ms": ms(med(slot_walls)),
    }
    out["upload_over_copy"] = round(med(walls) / med(copy_walls), 3)
    out["copy_GBps"] = round(nbytes / med(copy_walls) / 1e9, 2)
    return out


def reference_load(path: Path, config: ModelConfig, pool: LoraSlotPool, pin: bool) -> PackedAdapter:
    """The path the loader took before ``read_packed``: tensors into memory, packed, then a float32
    sum over the packed weights as the finite check (kept to compare against)."""
    packed = pool.pack(load_adapter(path, config, dtype=pool.dtype, check_finite=False), pin=pin)
    weights, _, _ = pool.views(packed.buffer)
    if not bool(torch.isfinite(weights.sum(dtype=torch.float32))):
        raise ValueError(f"adapter {path}: holds NaN or Inf values")
    return packed


def on_loader(fn: Any, device: str) -> Any:
    """``fn()`` on a thread set up as the adapter cache sets up its loader thread (torch on one core)."""
    index = (torch.device(device).index or 0) if device.startswith("cuda") else None
    with ThreadPoolExecutor(1, initializer=init_loader_thread, initargs=(index,)) as executor:
        return executor.submit(fn).result()


def bench_stages(
    config: ModelConfig, paths: dict[str, Path], dtype: torch.dtype, device: str, reps: int
) -> dict:
    """(b) Disk (page cache warm) -> packed host buffer, per stage of ``read_packed`` on a thread
    set up as the loader's, for each file dtype; against the reference path (on this thread, torch
    on every core, as the loader ran it). On CUDA the buffer is pinned and torch's caching host
    allocator hands back the previous load's buffer; on the CPU every load gets fresh pages from the
    kernel (page faults inside the read), so a reused buffer is measured too."""
    pin = device.startswith("cuda")
    pool = make_pool(config, dtype, "cpu")  # the layout only: no device memory needed here
    out: dict[str, Any] = {}
    for label, path in paths.items():
        path.joinpath("adapter_model.safetensors").read_bytes()  # warm the page cache
        sources: dict[str, Any] = {"pinned (torch's host cache)" if pin else "fresh": None}
        if not pin:
            kept = pool.new_buffer()
            kept.fill_(0)  # every page touched once, as in a buffer back from an allocator's cache
            sources["reused"] = lambda *, pin=False, kept=kept: kept
        for source, new_buffer in sources.items():
            if new_buffer is not None:
                pool.new_buffer = new_buffer  # type: ignore[method-assign]
            try:
                # Each buffer is dropped before the next load, so the allocator can hand it back.
                load = lambda path=path: read_packed(path, config, pool, pin=pin).stages
                runs = [on_loader(load, device) for _ in range(reps + 1)][1:]
            finally:
                pool.__dict__.pop("new_buffer", None)
            stages = {k: ms(statistics.median(r[k] for r in runs)) for k in runs[0]}
            totals = [sum(r.values()) for r in runs]
            stages["total"] = ms(statistics.median(totals))
            stages["total_min"] = ms(min(totals))
            out[f"{label} file, {source} buffer"] = stages
        walls = [
            timed(lambda path=path: reference_load(path, config, pool, pin), "cpu") for _ in range(reps + 1)
        ]
        out[f"{label} file, reference path (load_adapter + pack + sum)"] = {
            "total": ms(statistics.median(walls[1:]))
        }
    return out


def bench_stall(
    config: ModelConfig, path: Path, dtype: torch.dtype, device: str, reps: int, ops: int
) -> dict:
    """(b') A stand-in step loop on this thread while a load runs on another: the new reader on a
    thread set up as the loader's, and the reference path on a plain thread (as the loader ran it)."""
    pin = device.startswith("cuda")
    pool = make_pool(config, dtype, "cpu")
    path.joinpath("adapter_model.safetensors").read_bytes()
    index = (torch.device(device).index or 0) if pin else None
    return {
        "read_packed": gil_stall.measure(
            lambda: read_packed(path, config, pool, pin=pin),
            reps=reps,
            step_ops=ops,
            thread_init=lambda: init_loader_thread(index),
        ),
        "reference path": gil_stall.measure(
            lambda: reference_load(path, config, pool, pin), reps=reps, step_ops=ops
        ),
    }


def bench_cold_load(config: ModelConfig, path: Path, dtype: torch.dtype, device: str, reps: int) -> dict:
    """(b'') Disk (page cache warm) -> slot, per phase, and end to end through the loader thread."""
    cuda = device.startswith("cuda")
    pool = make_pool(config, dtype, device)
    phases: dict[str, list[float]] = {"read_packed": [], "upload": []}
    path.joinpath("adapter_model.safetensors").read_bytes()  # warm the page cache
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        packed = read_packed(path, config, pool, pin=cuda)
        t1 = time.perf_counter()
        upload = timed(lambda packed=packed: pool.write_packed(0, packed, non_blocking=True), device)
        for key, value in zip(phases, (t1 - t0, upload)):
            phases[key].append(value)
    cache = AdapterCache(config, pool, host_cache_bytes=0, dtype=dtype, background_loads=True)
    ends = []
    for _ in range(reps + 1):
        cache.register("cold", path)  # re-registering drops the host and slot copies: a cold load
        sync(device)
        t0 = time.perf_counter()
        while not cache.can_acquire("cold"):  # what the scheduler does each step
            cache.wait_for_loads(0.005)
        cache.acquire("cold")
        sync(device)
        ends.append(time.perf_counter() - t0)
        cache.release("cold")
    cache.close()
    med = statistics.median
    out = {f"{k}_ms": ms(med(v[1:])) for k, v in phases.items()}
    out["first_run_ms"] = {k: ms(v[0]) for k, v in phases.items()}  # pinned memory not yet cached
    out["end_to_end_via_loader_ms"] = ms(med(ends[1:]))
    return out


def bench_timeline(
    config: ModelConfig, dirs: list[Path], dtype: torch.dtype, device: str, batch: int
) -> dict:
    """(c) Steps of a decoding batch while another request's adapter loads from disk.

    ``dirs``: the running batch's adapter, the one loaded cold, and one for the warm-up request.
    """
    engine = Engine(
        LoadedModel(random_model(config, dtype=dtype, device=device), config, None),
        EngineConfig(
            max_batch_size=batch + 1, max_loras=3, max_lora_rank=RANK, num_kv_blocks=(batch + 1) * 24
        ),
    )
    engine.adapters.background_loads = True  # the default on CUDA; the CPU smoke run opts in
    engine.add_adapter("warm", dirs[0])
    engine.add_adapter("cold", dirs[1])
    engine.add_adapter("warm-up", dirs[2])
    gen = torch.Generator().manual_seed(1)
    sp = SamplingParams(max_new_tokens=300, temperature=0.0, ignore_eos=True)

    def prompt() -> tuple[int, ...]:
        return tuple(torch.randint(3, config.vocab_size, (PROMPT_LEN,), generator=gen).tolist())

    for i in range(batch):
        engine.add_request(Request(f"run-{i}", prompt(), "warm" if i % 2 else None, sp))
    for _ in range(8):  # prefill, then decode steps (compiles and captures whatever is still cold)
        engine.step()
    # A short request with a third adapter through a mixed prefill + decode step and a batch of
    # batch + 1 (three LoRA segments), so the measured admission below, the same shapes, does not
    # include compiling kernels for them.
    engine.add_request(
        Request(
            "warm-up", prompt(), "warm-up", SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
        )
    )
    while any(s.request_id == "warm-up" for s in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()
    assert len(engine.scheduler.running) == batch and not engine.adapters.loading()
    rows: list[dict] = []

    def step(loading: bool) -> None:
        t0 = time.perf_counter()
        engine.step()  # sampling reads the logits back: the wall time includes the device work
        wall = time.perf_counter() - t0
        admitted = any(s.request_id == "new" for s in engine.scheduler.running)
        event = "loading" if loading and not admitted else ""
        if admitted and not any(r["event"].startswith("admitted") for r in rows):
            event = "admitted: upload + prefill"
        rows.append({"ms": ms(wall), "event": event})

    for _ in range(10):
        step(False)
    engine.stats()  # drops earlier load times, so the next one is the cold adapter's
    engine.add_request(Request("new", prompt(), "cold", sp))
    t_add = time.perf_counter()
    step(True)
    rows[-1]["event"] = "load started"
    while not any(r["event"].startswith("admitted") for r in rows) and len(rows) < 1000:
        step(engine.adapters.loading())
    admitted_after = time.perf_counter() - t_add
    for _ in range(10):
        step(False)
    assert any(r["event"].startswith("admitted") for r in rows), "the new request was never admitted"
    (loader_seconds,) = engine.stats().adapter_load_seconds  # read + pack + upload of the cold load
    during = [r["ms"] for r in rows if r["event"] in ("load started", "loading")]
    return {
        "batch": batch,
        "load_ms_loader": ms(loader_seconds),
        "request_added_to_admitted_ms": ms(admitted_after),
        "median_step_ms_before": statistics.median(r["ms"] for r in rows[:10]),
        "max_step_ms_while_loading": max(during),
        "admit_step_ms": next(r["ms"] for r in rows if r["event"].startswith("admitted")),
        "steps": rows,
    }


def table(title: str, rows: dict) -> str:
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if k != "steps"]
    return "\n".join(lines)


def stages_table(result: dict) -> str:
    keys = ["parse", "alloc", "layout", "read", "convert", "finite", "total", "total_min"]
    lines = ["### (b) disk (page cache) -> packed host buffer, ms (median)", ""]
    lines += ["| file, buffer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, row in result.items():
        lines.append(f"| {label} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def stall_table(result: dict) -> str:
    keys = list(next(iter(result.values())))
    lines = ["### (b') a stand-in step loop while a load runs on another thread, ms", ""]
    lines += ["| metric | " + " | ".join(result) + " |", "|---" * (len(result) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(str(r[k]) for r in result.values()) + " |" for k in keys]
    return "\n".join(lines)


def timeline_table(result: dict) -> str:
    lines = ["### (c) steps while an adapter loads from disk", "", "| step | ms | event |", "|---|---|---|"]
    lines += [f"| {i} | {r['ms']} | {r['event']} |" for i, r in enumerate(result["steps"])]
    return "\n".join(lines)


PARTS = ("upload", "stages", "stall", "cold", "timeline")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="pool and file dtype (default: bfloat16, float32 for --tiny on the CPU)",
    )
    parser.add_argument(
        "--parts",
        help=f"comma-separated subset of {','.join(PARTS)} (default: all on CUDA or with --tiny; "
        "stages,stall on the CPU)",
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--step-ops", type=int, default=300, help="torch calls per stand-in step (stall)")
    parser.add_argument("--batch", type=int, default=32, help="decoding sequences in the timeline")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of the logic)")
    parser.add_argument("--out", type=Path, help="write bench_adapter_load.json here")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_adapter_load: no CUDA GPU here (use --device cpu)")
    parts = args.parts.split(",") if args.parts else PARTS if cuda or args.tiny else ("stages", "stall")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench_adapter_load: unknown part {unknown[0]!r}; choose from {','.join(PARTS)}")
    if args.reps < 1 or args.step_ops < 1:
        raise SystemExit("bench_adapter_load: --reps and --step-ops must be >= 1")
    config = ModelConfig(**(TINY if args.tiny else LLAMA2_7B))
    default_dtype = "float32" if args.tiny and not cuda else "bfloat16"
    dtype = getattr(torch, args.dtype or default_dtype)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # Only the adapters the chosen parts use are written (a 7B one takes seconds).
        used = {"upload": (0, 1), "stages": (2,), "stall": (2,), "cold": (2,), "timeline": (0, 2, 3)}
        wanted = {i for part in parts for i in used[part]}
        dirs = {i: write_adapter(Path(tmp) / f"a{i}", config, i, dtype) for i in sorted(wanted)}
        nbytes = (dirs[2] if 2 in dirs else dirs[0]).joinpath("adapter_model.safetensors").stat().st_size
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "shape": "tiny" if args.tiny else "llama-2-7b",
            "dtype": str(dtype).removeprefix("torch."),
            "adapter_file_bytes": nbytes,
            "torch_threads": torch.get_num_threads(),
        }
        shape = f"{results['shape']} r{RANK} all projections, {nbytes / 1e6:.0f} MB {results['dtype']} file"
        print(f"## adapter loading, {shape}, {results['device']}\n")
        if "upload" in parts:
            results["upload"] = bench_upload(config, [dirs[0], dirs[1]], dtype, args.device, args.reps)
            print(table("(a) host -> GPU upload (median)", results["upload"]), end="\n\n")
        if "stages" in parts:
            paths = {results["dtype"]: dirs[2]}
            if dtype != torch.float32:  # PEFT often saves float32: the reader converts on the way
                paths["float32"] = write_adapter(Path(tmp) / "f32", config, 2, torch.float32)
            results["stages"] = bench_stages(config, paths, dtype, args.device, args.reps)
            print(stages_table(results["stages"]), end="\n\n")
        if "stall" in parts:
            results["stall"] = bench_stall(
                config, dirs[2], dtype, args.device, max(3, args.reps // 2), args.step_ops
            )
            print(stall_table(results["stall"]), end="\n\n")
        if "cold" in parts:
            results["cold_load"] = bench_cold_load(
                config, dirs[2], dtype, args.device, max(3, args.reps // 4)
            )
            print(
                table("(b'') cold load from disk, page cache warm (median)", results["cold_load"]), end="\n\n"
            )
        if "timeline" in parts:
            results["timeline"] = bench_timeline(
                config, [dirs[2], dirs[3], dirs[0]], dtype, args.device, args.batch
            )
            print(table("(c) summary", results["timeline"]), end="\n\n")
            print(timeline_table(results["timeline"]))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {results['seconds']} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_adapter_load.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
