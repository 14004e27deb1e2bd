"""`lorafleet profile` on the tiny demo model (CPU, smallest grid, no Ray): the file it writes loads
back as a profile whose numbers come from the measurement."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.cli import main
from lorafleet.sim.profile import load_profile, shipped_profiles
from lorafleet.sim.profile_fit import adapter_sweep


@pytest.mark.slow
def test_profile_measures_and_writes_a_loadable_profile(tmp_path: Path) -> None:
    from lorafleet.worker.demo_assets import make_demo

    demo = make_demo(tmp_path / "demo", num_adapters=2)
    out = tmp_path / "p.yaml"
    argv = ["profile", "--model", str(demo.model_dir), "--device", "cpu", "--out", str(out)]
    argv += [
        "--engine",
        "max_batch_size=2",
        "--warmup",
        "0",
        "--repeats",
        "2",
        "--no-ray-start",
        "--no-serving",
    ]
    assert main(argv) == 0
    profile = load_profile(str(out))
    assert profile.name == "p"
    assert profile.engine.max_batch_size == 2 and profile.engine.max_loras == 8
    assert profile.decode_batch == (0, 1, 2)
    assert all(s > 0 for s in profile.decode_base_s[1:])
    assert profile.adapter_disk_load_s > 0 and profile.adapter_host_load_s > 0
    assert profile.worker_start_s > 0
    assert len(profile.samples) > 10 and all(len(s) == 5 for s in profile.samples)
    # Measured in rounds but kept sweep by sweep: the adapter sweep (full batch) comes last.
    sweep = adapter_sweep(profile.samples)
    assert {s[0] for s in sweep} == {2} and {s[3] for s in sweep} == {1, 2} and len(sweep) == 4


def test_profile_rejects_a_folder_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["profile", "--model", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "p.yaml")]) == 1
    )
    assert "no config.json" in capsys.readouterr().err


def test_shipped_profiles_load_by_name() -> None:
    assert "cpu-demo" in shipped_profiles()
    for name in shipped_profiles():
        profile = load_profile(name)
        assert profile.samples, f"{name}: a shipped profile carries its measurements"
        assert "lorafleet profile" in profile.source


def test_profile_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {max_batch_size: 4}\nstep_latency: {}\nadapter_load: {}\n")
    with pytest.raises(ValueError, match=rf"{bad}: missing key engine.max_num_batched_tokens"):
        load_profile(str(bad))
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_profile(str(bad))
    with pytest.raises(ValueError, match="neither a file nor a shipped profile"):
        load_profile("no-such-profile")


def test_the_shipped_h200_profile_is_a_measured_7b_profile() -> None:
    profile = load_profile("h200-llama2-7b")
    assert "h200-llama2-7b" in shipped_profiles()
    assert profile.engine.max_batch_size == 64
    assert "NVIDIA H200" in profile.source and "--device cuda" in profile.source
    # Measured, not invented: a full batch costs more than one sequence, both a few milliseconds.
    assert profile.decode_batch[1] == 1 and profile.decode_batch[-1] == 64
    assert 0.001 < profile.decode_base_s[1] < profile.decode_base_s[-1] < 0.05
    assert len(profile.samples) > 100


def test_per_sequence_step_overhead_and_wake_up_table_round_trip() -> None:
    import dataclasses

    from lorafleet.sim.profile import parse_profile

    plain = load_profile("cpu-demo")
    assert plain.step_overhead_per_seq_s == 0.0  # profiles from before the term load unchanged
    costly = dataclasses.replace(plain, step_overhead_per_seq_s=0.001, wake_up_s=((0.0, 0.0), (0.3, 0.004)))
    assert costly.step_s(4, 0, 100, 2) - plain.step_s(4, 0, 100, 2) == pytest.approx(0.004)
    assert costly.step_s(0, 32, 32, 1) == pytest.approx(plain.step_s(0, 32, 32, 1))
    again = parse_profile(costly.to_mapping(), "roundtrip")
    assert again.step_overhead_per_seq_s == 0.001 and again.wake_up_s == ((0.0, 0.0), (0.3, 0.004))
    assert plain.wake_up_s == () and plain.wake_s(10.0) == 0.0
    with pytest.raises(ValueError, match="step_overhead_per_seq_s"):
        dataclasses.replace(plain, step_overhead_per_seq_s=-1.0)
