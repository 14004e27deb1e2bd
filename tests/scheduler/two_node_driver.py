"""Driver process of test_two_node_cluster.py: a Fleet on a two-node Ray cluster, one node killed.

    python two_node_driver.py MODEL_DIR HEAD_ADDRESS

Joins the cluster, starts one CPU worker per node (each node has one CPU and each worker takes
one), prints `STARTED`, reads one line `KILL PID...` (the second node's processes, listed by the
test once the workers exist), sends greedy requests to both workers, SIGKILLs those processes as
soon as every request has streamed a token, and prints one JSON line: the tokens per request, the
errors, and the fleet's fault counters. Run as its own process so that Ray's global state and the
auth settings stay out of the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

from lorafleet.scheduler.fleet import Fleet
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.worker.types import Request, SamplingParams

PROMPTS = [(5, 17, 42, 99, 7), (300, 12, 8), (44, 45, 46, 47), (9, 9, 9, 9, 1)]
MAX_NEW = 160


async def main(model_dir: str, head: str) -> dict:
    config = FleetConfig(
        model_dir=model_dir,
        min_workers=2,
        max_workers=2,
        policy="least_loaded",  # one request per worker first, so both nodes serve some
        engine={"max_batch_size": 2},
        ray_address=head,
        worker_num_cpus=1.0,
        consolidation_interval_s=60.0,  # no migration muddles which node owns what
        idle_release_s=600.0,
        worker_start_timeout_s=20.0,  # the replacement for the lost node has nowhere to go
        max_start_attempts=1,
    )
    fleet = await Fleet.start(config)
    try:
        deadline = time.monotonic() + 120
        while fleet.status().num_active_workers < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the two workers did not start")
            await asyncio.sleep(0.2)
        print("STARTED", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        kill = [int(p) for p in line.split()[1:]]
        greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        tokens: dict[str, list[int]] = {}
        errors: dict[str, str] = {}

        async def run(i: int, prompt: tuple[int, ...]) -> None:
            rid = f"r{i}"
            tokens[rid] = []
            try:
                async for delta in fleet.generate(Request(rid, prompt, None, greedy)):
                    tokens[rid].extend(delta.new_token_ids)
            except Exception as exc:  # reported, the test fails on it
                errors[rid] = f"{type(exc).__name__}: {exc}"

        tasks = [asyncio.create_task(run(i, p)) for i, p in enumerate(PROMPTS)]
        killed_at = None
        while not all(t.done() for t in tasks):
            busy = [w for w in fleet.status().workers if w.num_running > 0]
            streaming = len(tokens) == len(PROMPTS) and all(tokens.values())
            if killed_at is None and len(busy) == 2 and streaming:
                for pid in kill:
                    with contextlib.suppress(ProcessLookupError):  # a child gone with its raylet
                        os.kill(pid, signal.SIGKILL)
                killed_at = {rid: len(t) for rid, t in tokens.items()}
            await asyncio.sleep(0.005)
        c = fleet.status().counters
        return {
            "tokens": tokens,
            "errors": errors,
            "killed_at": killed_at,
            "worker_deaths": c.worker_deaths,
            "resumed_after_fault": c.resumed_after_fault,
        }
    finally:
        await fleet.shutdown(drain=False)


def offline(model_dir: str) -> dict[str, list[int]]:
    from lorafleet.worker import Engine

    engine = Engine.from_pretrained(model_dir)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = engine.generate([list(p) for p in PROMPTS], sampling=greedy)
    return {f"r{i}": list(o.token_ids) for i, o in enumerate(outs)}


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2]))
    result["offline"] = offline(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
