"""The server's memory probe (soak diagnostics): off by default, clear errors, one JSON line a record."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from lorafleet.worker import memory_probe


def test_off_unless_the_directory_is_set(tmp_path: Path) -> None:
    assert memory_probe.settings_from_env({}) is None
    env = {memory_probe.ENV_DIR: str(tmp_path)}
    assert memory_probe.settings_from_env(env) == (tmp_path, 30.0, 0)
    env.update({memory_probe.ENV_INTERVAL: "2.5", memory_probe.ENV_FRAMES: "4"})
    assert memory_probe.settings_from_env(env) == (tmp_path, 2.5, 4)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (memory_probe.ENV_INTERVAL, "soon", "must be a number of seconds, got 'soon'"),
        (memory_probe.ENV_INTERVAL, "0", "must be > 0"),
        (memory_probe.ENV_FRAMES, "-1", "whole number of frames"),
    ],
)
def test_bad_settings_name_the_variable(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=key) as err:
        memory_probe.settings_from_env({memory_probe.ENV_DIR: str(tmp_path), key: value})
    assert message in str(err.value)


def test_records_sizes_objects_and_snapshots(tmp_path: Path) -> None:
    sizes = {"requests": 3}
    was_tracing = tracemalloc.is_tracing()
    probe = memory_probe.MemoryProbe(tmp_path / "probe", 2, lambda: dict(sizes))
    try:
        first = probe.record()
        sizes["requests"] = 0
        probe.record()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    lines = [json.loads(x) for x in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines()]
    assert [x["seq"] for x in lines] == [0, 1] and lines[0] == first
    assert [x["sizes"]["requests"] for x in lines] == [3, 0]
    assert lines[1]["rss_mb"] > 0 and lines[1]["objects"] > 1000 and "dict" in lines[1]["top_types"]
    snapshots = sorted(p.name for p in (tmp_path / "probe").glob("*.tracemalloc"))
    assert snapshots == ["snapshot-0000.tracemalloc", "snapshot-0001.tracemalloc"]
    tracemalloc.Snapshot.load(str(tmp_path / "probe" / snapshots[1]))  # loadable for soak_memory
