"""The runtime with a CUDA worker (num_gpus=1 from Ray): greedy outputs equal the in-process engine's."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")  # the GPU image may lack Ray

from lorafleet.scheduler.fleet import Fleet
from lorafleet.worker.types import Request, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("ray_local")]

ENGINE = {"max_batch_size": 4, "num_kv_blocks": 256}  # explicit: two engines share the GPU here


def test_cuda_worker_matches_in_process_engine(demo, fleet_config, register_all, run_async):
    from lorafleet.worker import Engine

    names = sorted(demo.adapters)
    prompts = [[5, 9, 13], [200, 3], [7, 7, 7, 7], [42]]
    adapters = [None, *names][: len(prompts)]
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    engine = Engine.from_pretrained(demo.model_dir, device="cuda", dtype="float32", **ENGINE)
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    expected = [o.token_ids for o in engine.generate(prompts, adapters=adapters, sampling=sampling)]
    del engine

    async def main():
        fleet = await Fleet.start(fleet_config(device="cuda", engine=ENGINE))
        try:
            register_all(fleet)

            async def run(i: int) -> tuple[int, ...]:
                tokens: list[int] = []
                request = Request(f"g{i}", tuple(prompts[i]), adapters[i], sampling)
                async for delta in fleet.generate(request):
                    tokens.extend(delta.new_token_ids)
                return tuple(tokens)

            return await asyncio.gather(*(run(i) for i in range(len(prompts))))
        finally:
            await fleet.shutdown()

    assert run_async(main()) == expected
