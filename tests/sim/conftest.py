"""Shared fixtures of the simulator tests: a small hand-written profile (tests only, not a measurement)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.sim.profile import LatencyProfile, load_profile

HERE = Path(__file__).parent


@pytest.fixture
def tiny_profile() -> LatencyProfile:
    return load_profile(str(HERE / "tiny_profile.yaml"))
