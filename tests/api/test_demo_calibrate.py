"""Calibration against the fake-fleet server: a full batch in flight, the median rate of its slices,
one worker busy; a fleet that produces nothing is a clear error."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.client.grpc_client import AsyncClient
from lorafleet.demo.calibrate import calibrate, wait_idle


def _calibrate(address: str, seconds: float = 1.0):
    async def main():
        async with AsyncClient(address) as client:
            cal = await calibrate(
                client,
                seconds=seconds,
                concurrency=4,
                prompt_len=(2, 6),
                output_len=(4, 8),
                popularity="skewed",
                seed=0,
            )
            await wait_idle(client, 5.0)  # the cancelled streams were aborted: nothing left running
            return cal

    return asyncio.run(main())


def test_calibration_measures_a_full_batch(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.token_delay_s = 0.01  # each stream: about 100 tokens/s, so 4 in flight: about 400
    del fleet.adapters["bob"]  # the fake fails some of bob's prompts on purpose; calibration must not
    cal = _calibrate(api.address)
    # One stream gives ~100 tokens/s and eight ~800; slice edges and timer slack move the figure.
    assert 150 < cal.tokens_per_s < 750, cal
    assert cal.requests_per_s == pytest.approx(cal.tokens_per_s / 6.0)
    assert len(cal.slice_tokens_per_s) == 1 and cal.max_busy_workers == 1
    assert not fleet.held


def test_calibration_that_produces_nothing_is_a_clear_error(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.token_delay_s = 5.0  # no token within the measured window
    del fleet.adapters["bob"]
    with pytest.raises(ValueError, match="produced no tokens"):
        _calibrate(api.address, seconds=0.8)
