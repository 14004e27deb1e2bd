"""The Ray runtime end to end on the tiny demo model: exact greedy outputs, errors, abort, start failures."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")  # the GPU image may lack Ray

from lorafleet.scheduler.errors import (
    FleetError,
    InvalidRequestError,
    QueueFullError,
    ShuttingDownError,
    UnknownAdapterError,
)
from lorafleet.scheduler.fleet import Fleet
from lorafleet.worker.types import FinishReason, Request, SamplingParams

pytestmark = pytest.mark.usefixtures("ray_local")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


async def collect(fleet: Fleet, request: Request) -> tuple[list[int], FinishReason]:
    tokens: list[int] = []
    reason = None
    async for delta in fleet.generate(request):
        assert reason is None, "a delta arrived after the final one"
        tokens.extend(delta.new_token_ids)
        reason = delta.finish_reason
    return tokens, reason


def test_mixed_adapter_concurrent_requests_match_offline_greedy(
    fleet_config, offline, register_all, run_async
):
    async def main():
        fleet = await Fleet.start(fleet_config(min_workers=2, max_workers=2, engine={"max_batch_size": 4}))
        try:
            names = register_all(fleet)
            adapters = [None, *names] * 3
            prompts = [[3 + i, 40 + 7 * i, 9, 200 - i][: 2 + i % 3] for i in range(len(adapters))]
            lengths = [6 + (5 * i) % 13 for i in range(len(adapters))]
            requests = [
                Request(f"mix-{i}", tuple(p), a, greedy(n))
                for i, (p, a, n) in enumerate(zip(prompts, adapters, lengths))
            ]
            results = await asyncio.gather(*(collect(fleet, r) for r in requests))
            expected = offline(prompts, adapters, lengths)
            assert [tuple(t) for t, _ in results] == [tuple(e) for e in expected]
            assert all(reason is FinishReason.LENGTH for _, reason in results)
            status = fleet.status()
            assert status.counters.requests_completed == len(requests)
            assert status.counters.tokens_generated == sum(lengths)
            assert status.queue_len == 0 and len(status.workers) == 2
        finally:
            await fleet.shutdown()

    run_async(main())


def test_errors_queue_limit_abort_and_shutdown(fleet_config, register_all, run_async, demo):
    async def main():
        fleet = await Fleet.start(fleet_config(max_queue=1))
        names = register_all(fleet)

        async def first(request):
            async for delta in fleet.generate(request):
                return delta
            return None

        with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
            await first(Request("e1", (1, 2), "nope"))
        with pytest.raises(InvalidRequestError, match="context"):
            await first(Request("e2", tuple(range(3, 3 + 600)), None))
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await first(Request("e3", (1, 10**6), None))

        # One worker, batch 2: two long requests run, a third waits, a fourth finds the queue full.
        streams = [fleet.generate(Request(f"q{i}", (5, 6, 7), names[0], greedy(400))) for i in range(3)]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.wait(firsts[:2])
        await asyncio.sleep(0.05)
        assert fleet.status().queue_len == 1
        with pytest.raises(QueueFullError, match="queue is full"):
            await first(Request("q3", (5, 6), None, greedy(4)))
        with pytest.raises(InvalidRequestError, match="already in flight"):
            await first(Request("q0", (5, 6), None, greedy(4)))
        assert fleet.status().counters.requests_rejected == 5  # e1, e2, e3, q3 and the second q0

        await fleet.abort("q2")  # queued
        delta = await firsts[2]
        assert delta.finish_reason is FinishReason.ABORT and delta.new_token_ids == ()
        await fleet.abort("q0")  # running
        async for delta in streams[0]:
            last = delta
        assert last.finish_reason is FinishReason.ABORT
        await streams[1].aclose()  # a caller that stops listening aborts its request too
        for _ in range(100):
            status = fleet.status()
            w = status.workers[0]
            if w.num_running == 0 and w.free_kv_blocks == w.total_kv_blocks:
                break
            await asyncio.sleep(0.05)
        assert w.num_running == 0 and w.free_kv_blocks == w.total_kv_blocks
        assert status.counters.requests_aborted == 3

        with pytest.raises(KeyError, match="unknown adapter 'ghost'"):
            fleet.unregister_adapter("ghost")
        with pytest.raises(ValueError, match=r"adapter_config\.json is missing"):
            fleet.register_adapter("bad", str(demo.model_dir), confined=False)
        fleet.unregister_adapter(names[0])
        assert names[0] not in fleet.list_adapters()

        # A drain that times out is cancelled, then everything still running is aborted.
        stream = fleet.generate(Request("last", (5, 6, 7), None, greedy(400)))
        await stream.__anext__()
        drain = asyncio.ensure_future(fleet.shutdown(drain=True))
        await asyncio.sleep(0.1)
        assert not drain.done()
        with pytest.raises(ShuttingDownError):
            await first(Request("late", (1, 2), None))
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        await fleet.shutdown(drain=False)
        reasons = [d.finish_reason async for d in stream]
        assert reasons[-1] is FinishReason.ABORT
        assert fleet.status().workers == ()

    run_async(main())


def test_worker_that_cannot_start_is_retried_with_backoff_then_reported(fleet_config, run_async):
    # The head accepts this engine config; only the worker finds max_model_len above the model's.
    config = fleet_config(engine={"max_model_len": 100_000}, max_start_attempts=2, start_backoff_s=0.05)

    async def main():
        with pytest.raises(FleetError, match=r"2 consecutive worker starts failed.*max_model_len"):
            await Fleet.start(config)

    run_async(main())
