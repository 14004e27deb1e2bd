"""A small case of the validation against the real runtime (CPU Ray fleet, demo model): the same
requests through both, checked where the comparison is robust on a shared 2-core machine.

Open-loop load under capacity makes throughput the offered load on both sides, so it must agree
closely; the simulator models no contention from other processes, so its TTFT must not exceed the
real one by more than noise; and every request must complete on both."""

from __future__ import annotations

import pytest

from lorafleet.bench.workload import phased_workload
from lorafleet.sim.profile import load_profile
from lorafleet.sim.validate import FleetSetup, compare, real_run, sim_run


@pytest.mark.slow
def test_small_validation_case(tmp_path) -> None:
    from lorafleet.worker.demo_assets import make_demo

    demo = make_demo(tmp_path / "demo", num_adapters=4)
    setup = FleetSetup(
        str(demo.model_dir), str(tmp_path / "demo" / "adapters"), max_workers=2, max_batch_size=4
    )
    plan = phased_workload(
        [(2.0, 3.0), (12.0, 3.0), (2.0, 3.0)],
        popularity="skewed",
        prompt_len=(8, 32),
        output_len=(8, 32),
        seed=1,
    )
    real = real_run(setup, plan)
    assert real.report.completed == len(plan)
    result = sim_run(setup, load_profile("cpu-demo"), real.sent)
    assert all(r.finish is not None for r in result.records)
    rows = compare(real, result)
    assert abs(rows["throughput_tok_s"]["error"]) < 0.25
    assert rows["ttft_mean_s"]["sim"] <= rows["ttft_mean_s"]["real"] * 1.5
    assert 1 <= rows["peak_workers"]["sim"] <= 2
