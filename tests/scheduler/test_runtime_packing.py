"""Packing through the runtime: a light load stays on one worker; the next fills only when it is full."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")  # the GPU image may lack Ray

from lorafleet.scheduler.fleet import Fleet
from lorafleet.worker.types import FinishReason, Request, SamplingParams

pytestmark = pytest.mark.usefixtures("ray_local")


def test_requests_pack_onto_the_fewest_workers(fleet_config, register_all, run_async, wait_for):
    async def main():
        fleet = await Fleet.start(fleet_config(min_workers=3, max_workers=3, engine={"max_batch_size": 3}))
        try:
            names = register_all(fleet)
            streams, firsts = [], []
            layouts = []
            for i in range(7):
                request = Request(
                    f"p{i}", (4 + i, 8, 15), names[i % len(names)], SamplingParams(400, 0.0, ignore_eos=True)
                )
                stream = fleet.generate(request)
                streams.append(stream)
                firsts.append(asyncio.ensure_future(stream.__anext__()))
                await wait_for(lambda n=i + 1: sum(w.num_running for w in fleet.status().workers) == n)
                layouts.append({w.worker_id: w.num_running for w in fleet.status().workers})
            first = max(layouts[2], key=layouts[2].get)
            second = max((w for w in layouts[5] if w != first), key=layouts[5].get)
            for n, layout in enumerate(layouts, start=1):
                busy = sorted((v for v in layout.values() if v), reverse=True)
                assert busy == [3] * (n // 3) + ([n % 3] if n % 3 else []), layouts
                assert layout[first] == min(n, 3), layouts  # the first worker fills before any other
            assert second != first and layouts[5][second] == 3
            for i in range(7):
                await fleet.abort(f"p{i}")
            for first_delta, stream in zip(firsts, streams):
                delta = await first_delta
                while delta.finish_reason is None:
                    delta = await stream.__anext__()
                assert delta.finish_reason is FinishReason.ABORT
        finally:
            await fleet.shutdown(drain=False)

    run_async(main())
