"""bench_fleet.py's kill step: the float32 (or other --kill-dtype) kill pair's two packing runs,
`packing-<dtype>` sized from its own warm-up and `packing-<dtype>-kill` on the prefix it completed,
their share of the time budget, and the comparison of any kill run against its reference (lost
requests, token differences, the noise floor of the runs without a kill: fleet_tokens.py).

A mixin of bench_fleet.FleetBench, which holds the state and the runs (one_run, fits, the budget);
the pair's sizing itself is fleet_pair.py's pure functions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import fleet_report
from fleet_pair import (
    KILL_RUN_WORKERS,
    PairPlan,
    completed_prefix,
    estimate_seconds,
    fixed_seconds,
    kill_run_plan,
    pair_names,
    replay_estimate,
    shortest_prefix,
    size_pair,
)
from fleet_plan import RunCosts
from fleet_run import SizePrefix, Warmup
from fleet_settings import Profile
from fleet_tokens import compare_runs

from lorafleet.bench.workload import TraceRow


class KillSteps:
    """The kill pair and the kill comparison, on FleetBench's state (the attributes below)."""

    prof: Profile
    kill: bool  # "kill" not in --skip
    kill_dtype: str | None  # --kill-dtype: the kill as its own pair
    begin: float  # monotonic start of the benchmark: the budget's clock
    costs: RunCosts | None
    rows: list[TraceRow]
    result: dict[str, Any]
    pair_arrivals: list[float]  # the kill pair's plan send times (its reference's)

    if TYPE_CHECKING:  # FleetBench's, which the steps here call back into

        def left_s(self) -> float: ...
        def log(self, message: str) -> None: ...
        def save(self) -> None: ...
        def note(self, text: str) -> None: ...
        def fits(self, what: str, need: float | None = None) -> bool: ...
        def migration_estimate(self) -> float: ...
        async def one_run(
            self,
            name: str,
            policy: str,
            kill: bool,
            pair: PairPlan | None = None,
            pair_run: bool = False,
            size_prefix: SizePrefix | None = None,
        ) -> None: ...

    def prompt_cap(self, pair_run: bool) -> int:
        """--max-prompt-tokens of a run: both runs of the kill pair clamp to the pair's cap."""
        prof = self.prof
        if pair_run and prof.pair_max_prompt_tokens is not None:
            return min(prof.max_prompt_tokens, prof.pair_max_prompt_tokens)
        return prof.max_prompt_tokens

    def pair_fixed_s(self, start_s: float | None = None, reference: bool = True) -> float:
        """One run of the kill pair besides its replay: its server's start (`start_s`, else the
        profile's estimate, else the first server's measured start), warm-up (the reference's after
        an untimed pass), tail and stop."""
        c = self.costs
        if start_s is None:
            measured = c.serve_start_s if c else 60.0
            start_s = self.prof.pair_start_s if self.prof.pair_start_s is not None else measured
        return fixed_seconds(
            start_s,
            # + waiting for the fleet to idle
            (self.prof.pair_prewarm_s if reference else 0.0) + self.prof.pair_warmup_s + 2.0,
            self.prof.tail_s,
            c.stop_s if c else self.prof.stop_s,
        )

    def pair_estimate(self) -> float:
        if not self.kill or self.kill_dtype is None:
            return 0.0
        fixed = (self.pair_fixed_s() + self.pair_fixed_s(reference=False)) / 2
        return estimate_seconds(fixed, self.prof.pair_replay_s)

    def pair_rate(self, warm: Warmup) -> float:
        """Requests/s of one worker of the pair's dtype from its warm-up, at the sizing's margin: the
        slices' mean (a float32 prefill step can outlast a half-second slice, which the median then
        drops), per busy worker (packing puts the warm-up's one batch on one of the two)."""
        prof = self.prof
        outputs = [max(1, min(r.generated_tokens, prof.max_new_tokens)) for r in self.rows[:2000]]
        tokens = warm.mean_tokens_per_s if warm.mean_tokens_per_s is not None else warm.tokens_per_s
        per_worker = tokens / max(1, warm.busy_workers)
        return per_worker / statistics.fmean(outputs) * prof.pair_rate_margin

    def size_reference(
        self, warm: Warmup, started_s: float, arrivals: list[float], burst_start: float
    ) -> tuple[int, float]:
        """The kill pair's prefix and its reference's deadline, once the reference's warm-up has
        measured one worker of the pair's dtype (fleet_run.SizePrefix). The prefix: the longest
        whose two replays fit what is left after both runs' other costs (the kill run's server
        start taken as long as this first one's, which paid the dtype's compiles). The deadline
        leaves the kill run only its shortest useful replay, so that a reference slower than the
        estimate still completes its prefix; the kill run then shrinks (kill_pair)."""
        prof = self.prof
        per_worker = self.pair_rate(warm)
        if not per_worker > 0:
            self.note(f"skipped the kill pair: the {self.kill_dtype} warm-up measured no tokens")
            raise ValueError(f"the {self.kill_dtype} warm-up measured no tokens: no speed to size the pair")
        kill_fixed = self.pair_fixed_s(started_s, reference=False)
        rest = prof.tail_s + (self.costs.stop_s if self.costs else prof.stop_s)
        budget = self.left_s() - 10.0 - self.migration_estimate() - rest - kill_fixed
        try:
            pair = size_pair(
                arrivals, burst_start, budget, per_worker, prof.kill_min_running, prof.max_batch_size
            )
        except ValueError as exc:
            self.note(f"skipped the kill pair: {exc}")
            raise
        least = shortest_prefix(arrivals, burst_start, prof.kill_min_running)
        # After a cut-off, the reference's server still stops, and the kill run starts only with its
        # fixed costs and the 10 s reserve left (kill_pair): keep those, not just its replay.
        stop = self.costs.stop_s if self.costs else prof.stop_s
        keep_s = kill_fixed + replay_estimate(arrivals, least, per_worker, KILL_RUN_WORKERS) + stop + 10.0
        deadline = self.begin + prof.budget_s - 5.0 - keep_s
        self.pair_arrivals = arrivals
        self.result["kill_pair"] = {
            **asdict(pair),
            "dtype": self.kill_dtype,
            "fixed_s": kill_fixed,
            "warmup_tokens_per_s": warm.tokens_per_s,
            "warmup_mean_tokens_per_s": warm.mean_tokens_per_s,
            "warmup_busy_workers": warm.busy_workers,
            "rate_margin": prof.pair_rate_margin,
            "max_prompt_tokens": self.prompt_cap(True),
            "reference_replay_s_allowed": deadline - time.monotonic(),
        }
        self.log(
            f"kill pair ({self.kill_dtype}): the warm-up measured {warm.mean_tokens_per_s or 0:.0f} tokens/s "
            f"(mean; median {warm.tokens_per_s:.0f}) on {warm.busy_workers} busy worker(s) = "
            f"{per_worker:.2f} requests/s at the {prof.pair_rate_margin:g} margin; the plan's first "
            f"{pair.requests} of {len(arrivals)} requests, ~{pair.reference_s:.0f} + {pair.kill_s:.0f} s "
            f"of replay; the reference may replay for {deadline - time.monotonic():.0f} s"
        )
        self.save()
        return pair.requests, deadline

    async def kill_pair(self) -> None:
        """The kill comparison as its own pair of packing runs in --kill-dtype (fleet_pair.py): the
        reference sizes the prefix from its own warm-up; the kill run replays the leading requests
        the reference completed, as many as the time left holds."""
        assert self.kill_dtype is not None
        prof = self.prof
        ref_name, kill_name = pair_names(self.kill_dtype)
        if not self.fits("the kill pair", self.pair_fixed_s() + self.pair_fixed_s(reference=False) + 10.0):
            return
        await self.one_run(ref_name, "packing", kill=False, pair_run=True, size_prefix=self.size_reference)
        ref = next((r for r in self.result["runs"] if r["name"] == ref_name), None)
        info = self.result.get("kill_pair")
        if ref is None or info is None or not self.pair_arrivals:
            return
        sent = len(ref["requests"])
        completed = completed_prefix(ref["requests"])
        if completed < sent:
            self.note(
                f"{ref_name} completed only its first {completed} of {sent} requests in the time it had: "
                "the kill run replays those"
            )
        if completed == 0:
            self.note(f"skipped {kill_name}: its reference completed no request")
            return
        kill_fixed = self.pair_fixed_s(ref["serve_started_s"], reference=False)
        budget = self.left_s() - 10.0 - self.migration_estimate() - kill_fixed
        least = shortest_prefix(self.pair_arrivals, ref["burst"][0], prof.kill_min_running)
        plan = kill_run_plan(
            self.pair_arrivals,
            completed,
            budget,
            info["worker_requests_per_s"],
            least,
            prof.kill_min_running,
            prof.max_batch_size,
        )
        if plan.requests < completed:
            self.note(f"{kill_name}: the time left holds {plan.requests} of the {completed} requests")
        info["kill_run"] = asdict(plan)
        self.save()
        if not self.fits(f"the {kill_name} run", kill_fixed + 10.0):
            return
        await self.one_run(kill_name, "packing", kill=True, pair=plan)
        judge = "raw" if self.kill_dtype == "float32" else "decisive"
        self.compare_kill(ref_name, kill_name, [], judge=judge)

    def compare_kill(self, ref_name: str, kill_name: str, noise: list[str], judge: str) -> None:
        """Lost requests and token differences of the kill run against `ref_name`, and the same
        between the runs without a kill named in `noise` (the noise floor). `judge`: the target's
        rule, "raw" (every token equal) or "decisive" (equal before the first near-tie)."""
        runs = {r["name"]: r for r in self.result["runs"]}
        ref, killed = runs.get(ref_name), runs.get(kill_name)
        if ref is None or killed is None:
            return
        tol = self.prof.decisive_gap
        try:
            out = compare_runs(ref, killed, tol)
        except ValueError as exc:  # runs of different plans: no comparison, but the steps after it run
            self.note(f"no token comparison of {kill_name} against {ref_name}: {exc}")
            return
        out["judge"] = judge
        out.update(killed.get("kill") or {"at_s": None, "pid": None, "running_at_kill": 0})
        out["resumed_after_fault"] = fleet_report.counter_delta(killed, "resumed_after_fault")
        out["worker_deaths"] = fleet_report.counter_delta(killed, "worker_deaths")
        out["noise_floor"] = [compare_runs(ref, runs[p], tol) for p in noise if p in runs]
        self.result["kill"] = out
        self.save()
