"""Measure what one worker sustains on this machine, so the demo can size its load from it.

A closed loop keeps exactly one batch of requests in flight (`concurrency` = the worker's batch
size): the packing policy puts them all on the first worker, which then runs a full batch. The
figure is the median of short slices, not the total: on a machine shared with other jobs a slice
that caught someone else's spike does not move it, and the slices are kept to show the spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.bench.workload import adapter_indices, prompt_token_ids
from lorafleet.client.grpc_client import ApiError, AsyncClient

WARMUP_SHARE = 0.25  # the first quarter loads adapters and warms caches: not counted
SLICE_S = 0.5


@dataclass(frozen=True)
class Calibration:
    seconds: float  # measured window (after the warm-up)
    concurrency: int
    tokens_per_s: float  # one worker running a full batch: median over the slices
    mean_output_tokens: float  # of the workload's output lengths
    slice_tokens_per_s: tuple[float, ...]
    max_busy_workers: int  # should be 1: more means the figure is not one worker's

    @property
    def requests_per_s(self) -> float:
        """Requests of the workload's mean length that one worker completes per second."""
        return self.tokens_per_s / self.mean_output_tokens

    @property
    def spread(self) -> float:
        """(p90 - p10) / median of the slices: how noisy the machine was while measuring."""
        q = statistics.quantiles(self.slice_tokens_per_s, n=10) if len(self.slice_tokens_per_s) > 1 else []
        return (q[-1] - q[0]) / self.tokens_per_s if q and self.tokens_per_s > 0 else 0.0


async def _closed_loop(
    client: AsyncClient,
    rng: random.Random,
    adapters: Sequence[str | None],
    vocab: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    stamps: list[tuple[float, int]],
) -> None:
    while True:
        prompt = prompt_token_ids(rng.randint(*prompt_len), vocab, rng)
        sampling = {"max_new_tokens": rng.randint(*output_len), "temperature": 0.0, "ignore_eos": True}
        async for chunk in client.stream(prompt, adapter=rng.choice(adapters), sampling=sampling):
            if chunk.token_ids:
                stamps.append((time.monotonic(), len(chunk.token_ids)))


async def _watch_busy(client: AsyncClient, seen: list[int]) -> None:
    while True:
        with contextlib.suppress(ApiError):
            seen.append((await client.status(timeout=5.0)).num_busy_workers)
        await asyncio.sleep(0.25)


async def calibrate(
    client: AsyncClient,
    *,
    seconds: float,
    concurrency: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    popularity: str,
    seed: int,
) -> Calibration:
    """Run one full batch for `seconds` and return its sustained token rate; ValueError if nothing ran."""
    status = await client.status(timeout=10.0)
    names = sorted(await client.list_adapters())
    # The workload's adapter mix, folded onto the registered adapters: the loads it causes count too.
    rng = random.Random(seed + 1)
    indices = adapter_indices(popularity, 256, rng)
    adapters: list[str | None] = [names[i % len(names)] for i in indices] if names else [None]
    stamps: list[tuple[float, int]] = []
    busy: list[int] = []
    start = time.monotonic()
    loops = [
        asyncio.create_task(
            _closed_loop(
                client,
                random.Random(seed * 1000 + i),
                adapters,
                status.model.vocab_size,
                prompt_len,
                output_len,
                stamps,
            )
        )
        for i in range(concurrency)
    ]
    watcher = asyncio.create_task(_watch_busy(client, busy))
    tasks = [*loops, watcher]
    try:
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failed request is a failed calibration: raise it
    finally:
        for task in tasks:
            task.cancel()  # leaving the streams cancels the calls; the fleet aborts them
        await asyncio.gather(*tasks, return_exceptions=True)
    measured_from = start + WARMUP_SHARE * seconds
    slices = max(1, int((start + seconds - measured_from) / SLICE_S))
    per_slice = [0] * slices
    for at, n in stamps:
        index = int((at - measured_from) / SLICE_S)
        if 0 <= index < slices:
            per_slice[index] += n
    rates = tuple(n / SLICE_S for n in per_slice)
    median = statistics.median(rates)
    if median <= 0:
        raise ValueError(
            f"calibration: one worker produced no tokens in {seconds:g} s; the machine is too busy "
            "to run the demo now (raise --calibration-s, or try again when it is quieter)"
        )
    return Calibration(
        seconds=slices * SLICE_S,
        concurrency=concurrency,
        tokens_per_s=median,
        mean_output_tokens=(output_len[0] + output_len[1]) / 2,
        slice_tokens_per_s=rates,
        max_busy_workers=max(busy, default=0),
    )


async def wait_idle(client: AsyncClient, timeout_s: float) -> None:
    """Until no request runs or waits, so the workload starts on an idle fleet (TimeoutError if not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = await client.status(timeout=5.0)
        if st.queue_len == 0 and st.num_busy_workers == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fleet still had work {timeout_s:g} s after the calibration")
        await asyncio.sleep(0.05)
