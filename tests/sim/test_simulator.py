"""The simulator end to end on small workloads: the real policies, growth, release, migration."""

from __future__ import annotations

import dataclasses
import random

import pytest

from lorafleet.sim.profile import LatencyProfile
from lorafleet.sim.sim_types import SimConfig, SimRequest
from lorafleet.sim.simulator import Simulator


def _bursty(n: int = 1200, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(25.0 if n // 3 < i < 2 * n // 3 else 3.0)
        out.append(SimRequest(t, f"a{rng.randrange(6)}", rng.randint(4, 60), rng.randint(1, 40)))
    return out


def test_every_request_completes_and_the_fleet_grows_then_shrinks(tiny_profile: LatencyProfile) -> None:
    reqs = _bursty()
    result = Simulator(SimConfig(policy="packing", max_gpus=8, idle_release_s=5.0), tiny_profile, reqs).run()
    assert all(r.finish is not None and r.first_token is not None for r in result.records)
    assert all(r.arrival <= r.first_token <= r.finish for r in result.records)
    assert 1 < result.peak_gpus <= 8
    assert result.workers_released > 0
    assert result.gpus_over_time[-1][1] < result.peak_gpus
    assert result.gpu_seconds < result.peak_gpus * result.end_s


def test_packing_with_migration_uses_fewer_gpu_seconds_than_spreading(tiny_profile: LatencyProfile) -> None:
    reqs = _bursty()
    runs = {
        cfg.label: Simulator(cfg, tiny_profile, reqs).run()
        for cfg in (
            SimConfig(policy="packing", max_gpus=8),
            SimConfig(policy="packing", max_gpus=8, migrations=False),
            SimConfig(policy="round_robin", max_gpus=8),
        )
    }
    assert runs["packing"].migrations > 0
    assert runs["packing-no-migration"].migrations == 0
    assert runs["packing"].gpu_seconds < runs["round_robin"].gpu_seconds


def test_deterministic(tiny_profile: LatencyProfile) -> None:
    reqs = _bursty(300)
    a = Simulator(SimConfig(policy="random", max_gpus=4), tiny_profile, reqs).run()
    b = Simulator(SimConfig(policy="random", max_gpus=4), tiny_profile, reqs).run()
    assert [r.finish for r in a.records] == [r.finish for r in b.records]


def test_a_request_larger_than_any_cache_is_rejected(tiny_profile: LatencyProfile) -> None:
    too_big = tiny_profile.engine.num_kv_blocks * tiny_profile.engine.block_size + 1
    reqs = [SimRequest(0.0, None, 8, 4), SimRequest(0.1, None, too_big, 4), SimRequest(0.2, None, 8, 4)]
    result = Simulator(SimConfig(max_gpus=2), tiny_profile, reqs).run()
    assert "KV blocks" in result.records[1].rejected
    assert result.records[0].finish is not None and result.records[2].finish is not None


def test_a_request_that_could_outgrow_the_kv_cache_is_refused_at_admission(
    tiny_profile: LatencyProfile,
) -> None:
    profile = dataclasses.replace(
        tiny_profile, engine=dataclasses.replace(tiny_profile.engine, max_model_len=512)
    )
    capacity = profile.engine.num_kv_blocks * profile.engine.block_size  # 256 tokens
    reqs = [SimRequest(0.0, None, 8, capacity), SimRequest(0.1, None, 8, 8)]
    result = Simulator(SimConfig(max_gpus=1), profile, reqs).run()
    assert "more KV blocks than a worker holds" in result.records[0].rejected
    assert result.records[1].finish is not None


def test_ttft_includes_the_worker_start_up(tiny_profile: LatencyProfile) -> None:
    # Worker 0 is full (batch 4) with long requests; the 5th waits for a new worker to start.
    reqs = [SimRequest(0.0, None, 4, 200) for _ in range(5)]
    result = Simulator(SimConfig(max_gpus=2, idle_release_s=100.0), tiny_profile, reqs).run()
    fifth = result.records[4]
    assert fifth.first_token is not None
    assert fifth.first_token >= tiny_profile.worker_start_s
    assert result.peak_gpus == 2


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="policy"):
        SimConfig(policy="nope")
    with pytest.raises(ValueError, match="max_gpus"):
        SimConfig(max_gpus=0)
    with pytest.raises(ValueError, match="pack_batch_target must be an integer >= 1"):
        SimConfig(pack_batch_target=0)


def test_a_batch_target_above_the_workers_limit_is_refused(tiny_profile: LatencyProfile) -> None:
    limit = tiny_profile.engine.max_batch_size
    with pytest.raises(ValueError, match=rf"pack_batch_target \({limit + 1}\) must be <= .* \({limit}\)"):
        Simulator(SimConfig(pack_batch_target=limit + 1), tiny_profile, [])


def test_a_batch_target_grows_the_fleet_further(tiny_profile: LatencyProfile) -> None:
    """With target 2 (the limit is 4) the fleet grows once workers hold 2 sequences, not 4: more
    GPUs in the burst, and every request still completes."""
    reqs = _bursty(900, seed=2)
    runs = {
        t: Simulator(SimConfig(max_gpus=12, pack_batch_target=t), tiny_profile, reqs).run() for t in (None, 2)
    }
    assert all(r.finish is not None for r in runs[2].records)
    assert runs[2].peak_gpus > runs[None].peak_gpus
    assert runs[2].config.label == "packing-target2"


def test_the_simulator_imports_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import lorafleet.sim.simulator, lorafleet.sim.workloads, lorafleet.sim.cli, "
        "lorafleet.sim.report; bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("target", [None, 2])
@pytest.mark.parametrize("policy", ["packing", "least_loaded", "round_robin", "random"])
def test_keeping_the_placement_index_across_passes_changes_nothing(
    tiny_profile: LatencyProfile, policy: str, target: int | None
) -> None:
    reqs = _bursty(600, seed=5)
    runs = [
        Simulator(
            SimConfig(
                policy=policy, max_gpus=6, idle_release_s=3.0, keep_index=keep, pack_batch_target=target
            ),
            tiny_profile,
            reqs,
        ).run()
        for keep in (False, True)
    ]
    assert [(r.first_token, r.finish, r.worker) for r in runs[0].records] == [
        (r.first_token, r.finish, r.worker) for r in runs[1].records
    ]
    assert runs[0].workers_released > 0  # releases (index rebuilds) happened along the way


def test_the_kept_index_equals_a_rebuild_at_every_pass(tiny_profile: LatencyProfile) -> None:
    # The simulator refreshes only the workers it saw change (and rebuilds when one leaves the
    # active set); a change it missed would show as a difference from an index built from scratch.
    from lorafleet.scheduler.placement_index import PlacementIndex
    from lorafleet.scheduler.policy_types import WorkerState

    def state(index: PlacementIndex) -> list[tuple]:
        return [(s.worker_id, s.batch, s.free, frozenset(s.resident)) for s in index.slots]

    class Checked(Simulator):
        passes = 0

        def _sync_index(self) -> PlacementIndex | None:
            index = super()._sync_index()
            assert index is not None
            active = [w.snapshot() for w in self.live if w.state is WorkerState.ACTIVE]
            assert state(index) == state(PlacementIndex(active))
            Checked.passes += 1
            return index

    cfg = SimConfig(policy="packing", max_gpus=6, idle_release_s=3.0)
    result = Checked(cfg, tiny_profile, _bursty(600, seed=3)).run()
    assert Checked.passes > 100 and result.workers_released > 0 and result.peak_gpus > 2


def test_a_worker_that_slept_answers_later_by_the_wake_up_table(tiny_profile: LatencyProfile) -> None:
    woken = dataclasses.replace(tiny_profile, wake_up_s=((0.0, 0.0), (0.1, 0.002), (1.0, 0.010)))
    assert [woken.wake_s(x) for x in (0.0, 0.05, 0.1, 0.55, 1.0, 9.0)] == pytest.approx(
        [0.0, 0.001, 0.002, 0.006, 0.010, 0.010]
    )
    # One request after 5 s of idling, a second while the first runs, a third 0.55 s after the
    # second ended (without wake-ups); one worker, so nothing moves.
    reqs = [SimRequest(5.0, "a0", 8, 30), SimRequest(5.001, "a0", 8, 30)]
    config = SimConfig(policy="packing", max_gpus=1)
    plain = Simulator(config, tiny_profile, reqs).run()
    later = plain.records[1].finish - tiny_profile.request_overhead_s + 0.55
    reqs.append(SimRequest(later, "a0", 8, 30))
    plain = Simulator(config, tiny_profile, reqs).run()
    slept = Simulator(config, woken, reqs).run()
    first, second, third = (s.first_token - p.first_token for p, s in zip(plain.records, slept.records))
    assert first == pytest.approx(0.010)  # idle since the start: past the table's end
    assert second == pytest.approx(0.010)  # admitted at the step after the woken one: it waited for it
    # Its worker ended 10 ms later in the woken run, so it slept 0.54 s before this request.
    assert third == pytest.approx(woken.wake_s(0.54))
    with pytest.raises(ValueError, match="ascending"):
        dataclasses.replace(tiny_profile, wake_up_s=((0.5, 0.0), (0.1, 0.0)))
    with pytest.raises(ValueError, match="wake_up_s extra"):
        dataclasses.replace(tiny_profile, wake_up_s=((0.0, -1.0),))
