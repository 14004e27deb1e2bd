"""The worker actor's engine loop captures the graphs left for idle moments only while idle."""

from __future__ import annotations

import asyncio

from lorafleet.scheduler.worker_actor import WorkerActor


class IdleEngine:
    """Just what the loop calls: no sequences, three idle captures pending, then a step on demand."""

    def __init__(self) -> None:
        self.pending = 3
        self.unfinished = False
        self.calls: list[str] = []

    def list_adapters(self) -> dict[str, str]:
        return {}

    def has_unfinished(self) -> bool:
        return self.unfinished

    def has_idle_work(self) -> bool:
        return self.pending > 0 and not self.unfinished

    def run_idle_work(self) -> bool:
        self.calls.append("capture")
        self.pending -= 1
        return True

    def step(self) -> list:
        self.calls.append("step")
        self.unfinished = False
        return []

    def stats(self) -> object:
        return None


def test_idle_captures_run_until_none_is_left_and_never_while_work_waits() -> None:
    async def scenario() -> list[str]:
        engine = IdleEngine()
        actor = WorkerActor("w0", "unused", "cpu", "float32", {}, engine_factory=lambda: engine)
        loop_task = asyncio.get_running_loop().create_task(actor._engine_loop())
        for _ in range(50):
            await asyncio.sleep(0.01)
            if engine.pending == 0:
                break
        assert engine.calls == ["capture"] * 3
        # Work arrives: the loop steps it (no capture is left, and none would run while it waits).
        engine.pending, engine.unfinished = 2, True
        async with actor._lock:
            actor._wake.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if "step" in engine.calls:
                break
        loop_task.cancel()
        return engine.calls

    calls = asyncio.run(scenario())
    first_step = calls.index("step")
    assert calls[:first_step] == ["capture"] * 3
