"""CPU smoke run of benchmarks/bench_adapter_load.py's logic on tiny shapes (numbers meaningless)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.worker.model_config import ModelConfig


def test_bench_adapter_load_tiny_cpu(tmp_path: Path, bench_import) -> None:
    bench = bench_import("bench_adapter_load")
    config = ModelConfig(**bench.TINY)
    dirs = [bench.write_adapter(tmp_path / f"a{i}", config, i, torch.float32) for i in range(4)]
    up = bench.bench_upload(config, dirs[:2], torch.float32, "cpu", reps=2)
    assert up["bytes"] > 0 and up["cache_upload_wall_ms"] > 0 and up["pinned_copy_wall_ms"] > 0
    f32, bf16 = dirs[1], bench.write_adapter(tmp_path / "bf16", config, 1, torch.bfloat16)
    stages = bench.bench_stages(config, {"bfloat16": bf16, "float32": f32}, torch.bfloat16, "cpu", reps=2)
    assert set(stages) == {
        f"{d} file, {b}" for d in ("bfloat16", "float32") for b in ("fresh buffer", "reused buffer")
    } | {f"{d} file, reference path (load_adapter + pack + sum)" for d in ("bfloat16", "float32")}
    assert all(row["total"] > 0 for row in stages.values())
    assert stages["float32 file, fresh buffer"]["convert"] > 0 and "| parse |" in bench.stages_table(stages)
    stall = bench.bench_stall(config, bf16, torch.bfloat16, "cpu", reps=2, ops=20)
    assert set(stall) == {"read_packed", "reference path"} and "| metric |" in bench.stall_table(stall)
    assert all(int(r["steps (alone / during)"].split(" / ")[1]) >= 2 for r in stall.values())
    cold = bench.bench_cold_load(config, dirs[2], torch.float32, "cpu", reps=1)
    assert set(cold["first_run_ms"]) == {"read_packed", "upload"}
    assert cold["end_to_end_via_loader_ms"] > 0
    tl = bench.bench_timeline(config, [dirs[2], dirs[3], dirs[0]], torch.float32, "cpu", batch=2)
    events = [r["event"] for r in tl["steps"]]
    assert events[:10] == [""] * 10 and events[10] == "load started"
    assert events.count("admitted: upload + prefill") == 1 and events[-10:] == [""] * 10
    assert tl["load_ms_loader"] > 0 and tl["max_step_ms_while_loading"] > 0
    assert "| step | ms | event |" in bench.timeline_table(tl) and "| batch | 2 |" in bench.table("t", tl)
