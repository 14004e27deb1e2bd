"""bench_fleet.py's last step: one in-process fleet of two workers (fleet_migration.start_pair), the
migration at each --migration-contexts length on it (fleet_migration.py), then the Ray delivery
overhead through it against an Engine in the benchmark's process (fleet_delivery.py); and that
step's share of the time budget, which the phase sizing and the kill pair reserve before it runs.

A mixin of bench_fleet.FleetBench, which holds the state and the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import TYPE_CHECKING, Any

from fleet_assets import Assets
from fleet_plan import RunCosts
from fleet_settings import Profile, engine_dict


class InProcessSteps:
    """The migration and delivery measurements, on FleetBench's state (the attributes below)."""

    prof: Profile
    args: argparse.Namespace
    skip: set[str]  # --skip: "migration", "delivery" leave their measurement out
    costs: RunCosts | None
    assets: Assets
    result: dict[str, Any]

    if TYPE_CHECKING:  # FleetBench's, which the steps here call back into

        def left_s(self) -> float: ...
        def log(self, message: str) -> None: ...
        def note(self, text: str) -> None: ...
        def stage(self, name: str, start: float, info: Any = None) -> None: ...
        def fits(self, what: str, need: float | None = None) -> bool: ...

    def migration_estimate(self) -> float:
        """The migration fleet's start and moves, and the delivery measurement after them."""
        if {"migration", "delivery"} <= self.skip:
            return 0.0
        c = self.costs
        start = c.serve_start_s if c else 60.0
        per = 1.5 if self.prof.device == "cuda" else 3.0
        moves = (
            0
            if "migration" in self.skip
            else len(self.prof.migration_contexts) * (2 + self.args.migration_repeats)
        )
        delivery = 0.0 if "delivery" in self.skip else self.prof.delivery_s
        return 0.5 * start + 5.0 + per * moves + delivery

    async def migration_and_delivery(self) -> None:
        from fleet_delivery import in_process, summary, through_fleet
        from fleet_migration import start_pair

        start = time.monotonic()
        self.log("migration / delivery: an in-process fleet of two workers")
        prof, adapter = self.prof, str(self.assets.adapters_dir / "adapter-0")
        engine = engine_dict(prof)
        try:
            fleet, started_s = await asyncio.wait_for(
                start_pair(
                    model_dir=str(self.assets.model_dir), device=prof.device, dtype=prof.dtype, engine=engine
                ),
                max(10.0, self.left_s()),
            )
        except Exception as exc:
            self.note(f"migration fleet failed to start: {type(exc).__name__}: {exc}")
            return
        fleet_side = None
        try:
            if "migration" not in self.skip:
                await self.migration(fleet, adapter, start, started_s)
            if "delivery" not in self.skip and self.left_s() > prof.delivery_s:
                begin = time.monotonic()
                try:
                    fleet_side = await asyncio.wait_for(
                        through_fleet(fleet, adapter, prof.delivery_requests, prof.delivery_new_tokens),
                        max(10.0, self.left_s()),
                    )
                    self.result["delivery"] = summary(fleet_side, None)
                    self.stage("delivery through the fleet", begin)
                except Exception as exc:
                    self.note(f"delivery measurement through the fleet failed: {type(exc).__name__}: {exc}")
        finally:
            await fleet.shutdown(drain=False)
        if fleet_side is None:
            return
        # No deadline can cut a model load short: start it only with its whole estimate left.
        if not self.fits("the in-process side of the delivery measurement", prof.delivery_s):
            return
        begin = time.monotonic()
        try:
            engine_side = await asyncio.to_thread(
                in_process,
                model_dir=str(self.assets.model_dir),
                adapter_dir=adapter,
                device=prof.device,
                dtype=prof.dtype,
                engine=engine,
                n=prof.delivery_requests,
                new_tokens=prof.delivery_new_tokens,
                shards=fleet_side["shards"],
            )
        except Exception as exc:
            self.note(f"delivery measurement in-process failed: {type(exc).__name__}: {exc}")
            return
        self.result["delivery"] = summary(fleet_side, engine_side)
        self.stage("delivery in-process", begin)

    async def migration(self, fleet: Any, adapter: str, start: float, started_s: float) -> None:
        from fleet_migration import measure_migrations

        try:
            mig = await asyncio.wait_for(
                measure_migrations(
                    fleet,
                    adapter_dir=adapter,
                    contexts=list(self.prof.migration_contexts),
                    warmups=2,
                    repeats=self.args.migration_repeats,
                    seed=self.args.seed,
                ),
                max(10.0, self.left_s()),
            )
            self.result["migration"] = {**mig, "fleet_start_s": started_s}
            self.stage("migration", start)
        except Exception as exc:
            self.note(f"migration measurement failed: {type(exc).__name__}: {exc}")
