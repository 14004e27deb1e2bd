"""The fleet on two GPUs (issue 12): packing with migration against least-loaded and round-robin on a
quiet / burst / quiet slice of the Azure conv trace, a worker killed mid-burst, and the cost of one
migration. One command, inside a time budget:

    python3 benchmarks/bench_fleet.py --out DIR                 # 2 GPUs: 7B-shaped bf16, 100 r16 adapters
    python3 benchmarks/bench_fleet.py --out DIR --smoke         # CPU: tiny demo model, a few minutes
    python3 benchmarks/bench_fleet.py --render DIR              # fleet.md and fleet.png again from fleet.json

Steps (each logged with its time; fleet.json is rewritten after each, so a cut-off run keeps what
it measured):
1. `lorafleet make-demo [--shape llama2-7b]` writes the model and a few distinct adapters; more
   adapter folders share their weights by hard link (fleet_assets.py) up to --adapters.
2. For each policy, `lorafleet serve --workers 1 --max-workers 2 --policy P` (its own local Ray),
   a warm-up closed loop of one full batch (the first run's also measures one worker's token rate,
   after an untimed pass that pays the compiles and adapter loads), then `lorafleet bench --trace
   CONV --servegen DIR --phases QUIET,BURST,QUIET` (fleet_run.py), every request greedy and asking
   for its tokens' top-2 logprobs. The rates are the profile's (GPU: 4 and 22 requests/s, from the
   engine's measured throughput; `--rates`), or with `--rates warmup` (the --smoke default) sized
   from the first warm-up: quiet = --quiet-factor x one worker's capacity, burst = --burst-factor x.
   The phase lengths are shrunk to fit the budget. Every run replays the same plan.
3. The packing run again, the worker holding the most sequences (status RPC) SIGKILLed once it
   holds --kill-min-running in the burst: lost requests, and requests whose tokens differ from the
   run without the kill, raw and by the decisive-step rule (fleet_tokens.py), against the noise
   floor of the runs without a kill. With --kill-dtype: a pair of packing runs in that dtype on the
   plan's first requests instead, without and with the kill, prompts clamped to
   --pair-max-prompt-tokens, as many requests as the speed the reference's own warm-up measures fits
   in the budget (fleet_pair.py sizes it; float32: raw equality). fleet_kill.py runs the pair and
   compares either kill run with its reference.
4. One migration between two workers at each --migration-contexts length (fleet_migration.py),
   then the Ray delivery overhead on that fleet (fleet_delivery.py), both on one in-process fleet
   (fleet_inprocess.py); --skip leaves steps out.
Outputs in --out: fleet.json (settings, machine, every run's samples and requests, summaries),
fleet.md (tables, bootstrap intervals: fleet_stats.py), fleet.png (GPUs in use per run), logs.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

# The sibling fleet_*.py modules import as top-level modules: run this file as a script.
import fleet_report
from fleet_assets import make_assets
from fleet_inprocess import InProcessSteps
from fleet_kill import KillSteps
from fleet_pair import PairPlan
from fleet_plan import RunCosts, burst_window, capacity_rates, replay_seconds, scale_phases, shaped_phases
from fleet_run import RunSpec, SizePrefix, Warmup, run_one
from fleet_settings import Profile, build_parser, machine, settings

from lorafleet.bench.workload import read_azure_trace


class FleetBench(KillSteps, InProcessSteps):
    """The steps in order (module doc) on one time budget; the kill step is fleet_kill.py's, the
    migration and delivery step fleet_inprocess.py's."""

    def __init__(self, prof: Profile, extra: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
        self.prof, self.args, self.out = prof, args, out
        self.policies: list[str] = extra["policies"]
        self.skip: set[str] = extra["skip"]
        self.kill = "kill" not in self.skip
        self.kill_dtype: str | None = extra["kill_dtype"]  # the kill as its own pair (fleet_pair.py)
        self.begin = time.monotonic()
        self.work = Path(args.work_dir)
        self.phases: str | None = None
        self.costs: RunCosts | None = None
        self.later_runs_s: list[float] = []  # measured length of each run after the first
        self.pair_arrivals: list[float] = []  # the kill pair's plan send times (its reference's)
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "load_average_start": os.getloadavg(),
            "profile": asdict(prof),
            "policies": self.policies,
            "stages": {},
            "runs": [],
            "notes": [],
        }

    def left_s(self) -> float:
        return self.prof.budget_s - (time.monotonic() - self.begin)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.begin:6.1f} s] {message}", flush=True)

    def save(self) -> None:
        self.result["load_average_end"] = os.getloadavg()
        self.result["elapsed_s"] = time.monotonic() - self.begin
        (self.out / "fleet.json").write_text(json.dumps(self.result))

    # ------------------------------------------------------------ stages

    async def run(self) -> None:
        prof = self.prof
        self.work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        assets = await asyncio.to_thread(
            make_assets,
            self.work,
            shape=prof.shape,
            num_adapters=self.args.adapters,
            distinct=prof.distinct_adapters,
            log_path=self.work / "make-demo.log",
            device=prof.device,
        )
        self.stage(
            "assets", start, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(assets).items()}
        )
        self.assets = assets
        if self.args.assets_only:
            self.save()
            return
        self.rows = read_azure_trace(self.args.trace)
        for i, policy in enumerate(self.policies):
            if i and not self.fits(f"the {policy} run"):
                continue
            await self.one_run(policy, policy, kill=False)
        if self.kill and self.phases is not None:
            if self.kill_dtype is not None:
                await self.kill_pair()
            elif self.fits("the kill run"):
                await self.one_run("packing-kill", "packing", kill=True)
                self.compare_kill("packing", "packing-kill", self.policies[1:], judge="decisive")
        wanted = {"migration", "delivery"} - self.skip
        if wanted and self.fits(f"the {' and '.join(sorted(wanted))} measurement", self.migration_estimate()):
            await self.migration_and_delivery()
        self.finish()

    def fits(self, what: str, need: float | None = None) -> bool:
        if need is None:  # a run: as long as the longest one after the first, or the estimate
            need = max(self.later_runs_s) if self.later_runs_s else self.run_estimate(self.plan_s())
        if self.left_s() >= need:
            return True
        self.note(f"skipped {what}: {self.left_s():.0f} s of the budget left, about {need:.0f} s needed")
        return False

    def plan_s(self) -> float:
        return burst_window(self.phases)[2] if self.phases else 0.0

    def run_estimate(self, replay_s: float) -> float:
        c = self.costs
        return (c.serve_start_s + c.warmup_s + replay_s + c.tail_s + c.stop_s) if c else 0.0

    def note(self, text: str) -> None:
        self.log(text)
        self.result["notes"].append(text)
        self.save()

    def stage(self, name: str, start: float, info: Any = None) -> None:
        self.result["stages"][name] = {"seconds": time.monotonic() - start, "info": info}
        self.log(f"{name}: {time.monotonic() - start:.1f} s")
        self.save()

    def spec(
        self, name: str, policy: str, kill: bool, pair: PairPlan | None = None, pair_run: bool = False
    ) -> RunSpec:
        """The run's settings. `pair_run`: a run of the kill pair (its dtype, both workers from the
        start, its prompt cap and warm-up); `pair`: its prefix and kill rule (None: the reference,
        which sizes its prefix after its warm-up)."""
        prof, a = self.prof, self.assets
        pair_run = pair_run or pair is not None
        dtype = self.kill_dtype if pair_run and self.kill_dtype else prof.dtype
        workers = "2" if pair_run else "1"
        serve = ["--model", str(a.model_dir), "--adapters-dir", str(a.adapters_dir)]
        serve += ["--device", prof.device, "--dtype", dtype, "--workers", workers, "--max-workers", "2"]
        serve += ["--port", "0", "--http-port", "off", "--metrics-port", "off", "--max-queue", "8192"]
        serve += ["--idle-release-s", f"{prof.idle_release_s:g}", "--consolidation-interval-s", "1"]
        serve += ["--drain-timeout-s", "5", "--engine", f"max_batch_size={prof.max_batch_size}"]
        if policy == "packing" and not pair_run and prof.pack_batch_target is not None:
            serve += ["--pack-batch-target", str(prof.pack_batch_target)]
        for option in prof.engine:
            serve += ["--engine", option]
        bench = ["--trace", self.args.trace, "--servegen", self.args.servegen]
        bench += ["--trace-start-s", f"{self.args.trace_start_s:g}", "--seed", str(self.args.seed)]
        bench += [
            "--max-new-tokens",
            str(prof.max_new_tokens),
            "--max-prompt-tokens",
            str(self.prompt_cap(pair_run)),
        ]
        bench += ["--aliases", "0", "--request-timeout", "600"]
        first = self.phases is None
        warmup_s = prof.warmup_s[0] if first else prof.warmup_s[1]
        prewarm_s = prof.prewarm_s if first else 0.0
        if pair_run:
            # The reference's warm-up measures the speed its prefix is sized from, after an untimed
            # pass through the dtype's first kernel compiles; the kill run's finds them cached.
            warmup_s = prof.pair_warmup_s
            prewarm_s = prof.pair_prewarm_s if pair is None else 0.0
        return RunSpec(
            name=name,
            policy=policy,
            kill=kill,
            serve_args=serve,
            bench_args=bench,
            max_batch_size=prof.max_batch_size,
            warmup_s=warmup_s,
            prewarm_s=prewarm_s,
            tail_s=prof.tail_s,
            sample_every_s=prof.sample_every_s,
            serve_timeout_s=prof.serve_timeout_s,
            kill_min_running=pair.kill_min_running if pair is not None else prof.kill_min_running,
            max_requests=pair.requests if pair is not None else None,
        )

    async def one_run(
        self,
        name: str,
        policy: str,
        kill: bool,
        pair: PairPlan | None = None,
        pair_run: bool = False,
        size_prefix: SizePrefix | None = None,
    ) -> None:
        """One run, recorded; its replay ends 5 s before the budget's end at the latest (or when
        `size_prefix` says, fleet_run.run_one)."""
        start = time.monotonic()
        self.log(f"run {name}: starting lorafleet serve --policy {policy}")
        deadline = self.begin + self.prof.budget_s - 5.0
        spec = self.spec(name, policy, kill, pair, pair_run)
        try:
            record = await run_one(
                spec,
                self.rows,
                self.work,
                phases=self.phases,
                choose_phases=self.choose_phases,
                burst_of=burst_window,
                deadline=deadline,
                size_prefix=size_prefix,
            )
        except Exception as exc:  # a failed run is a result: record it and go on with the next
            self.note(f"run {name} failed: {type(exc).__name__}: {exc}")
            return
        record["kill_run"] = kill
        record["dtype"] = spec.serve_args[spec.serve_args.index("--dtype") + 1]
        record["pair"] = pair_run or pair is not None
        self.result["runs"].append(record)
        if self.costs is not None:
            self.costs = replace(self.costs, stop_s=max(self.costs.stop_s, record["serve_stop_s"]))
        if len(self.result["runs"]) > 1:
            self.later_runs_s.append(time.monotonic() - start)
        self.stage(f"run {name}", start, {"serve_started_s": record["serve_started_s"]})

    def choose_phases(self, warm: Warmup, started_s: float) -> str:
        """The profile's rates (or the warm-up's), phase lengths from the budget (module doc)."""
        prof = self.prof
        outputs = [max(1, min(r.generated_tokens, prof.max_new_tokens)) for r in self.rows[:2000]]
        mean_out = statistics.fmean(outputs)
        capacity = warm.tokens_per_s / mean_out if warm.tokens_per_s > 0 else None
        if prof.rates is not None:
            quiet, burst = prof.rates
        else:
            capacity, quiet, burst = capacity_rates(
                warm.tokens_per_s, mean_out, self.args.quiet_factor, self.args.burst_factor
            )
        # A later server skips the first's Triton compiles; it is seldom under 0.65x the first's
        # start (first H200 run: 48 s, then 27-29 s), whatever else a start now pays.
        restart = max(prof.restart_s, 0.65 * started_s) if prof.restart_s is not None else started_s
        self.costs = RunCosts(restart, prof.warmup_s[1] + 2.0, prof.tail_s, prof.stop_s)
        runs_after = len(self.policies) - 1
        extra = self.migration_estimate() + self.pair_estimate()
        phases_s = prof.phases_s
        runs_after += int(self.kill and self.kill_dtype is None)
        plan_s = replay_seconds(self.left_s(), runs_after, self.costs, extra, 10.0)
        # The quiet after the burst must still hold the second GPU's release (the GPU-seconds
        # difference): it gives up at most its room above the profile's floor.
        floors = (phases_s[0] / 2, max(prof.idle_release_s + 10.0, prof.quiet_after_min_s))
        seconds = scale_phases(phases_s, plan_s, floors)
        if self.kill and seconds[1] < 0.6 * phases_s[1]:
            # The policy comparison comes first: size the replay without the kill run (or pair),
            # which then runs only if the budget still has room for it.
            extra = self.migration_estimate()
            plan_s = replay_seconds(self.left_s(), len(self.policies) - 1, self.costs, extra, 10.0)
            self.note(
                f"budget: the replay is sized without the kill run ({plan_s:.0f} s); it runs if time is left"
            )
            seconds = scale_phases(phases_s, plan_s, floors)
        if min(seconds) < 1.0:
            self.note(f"budget: only {plan_s:.0f} s per replay; phases of at least 1 s each instead")
            seconds = tuple(max(1.0, x) for x in seconds)
        self.phases = shaped_phases(quiet, burst, seconds)
        self.result["sizing"] = {
            "warmup_tokens_per_s": warm.tokens_per_s,
            "warmup_mean_tokens_per_s": warm.mean_tokens_per_s,
            "warmup_busy_workers": warm.busy_workers,
            "warmup_spread": warm.spread,
            "mean_output_tokens": mean_out,
            "one_worker_requests_per_s": capacity,
            "rates_given": prof.rates is not None,
            "rates": [quiet, burst],
            "plan_s_budget": plan_s,
            "phases": self.phases,
        }
        per_worker = f"{capacity:.2f} requests/s" if capacity else "no figure"
        self.log(f"one worker: {warm.tokens_per_s:.0f} tokens/s = {per_worker}; phases {self.phases}")
        self.save()
        return self.phases

    def finish(self) -> None:
        logs = sorted(self.work.glob("*.log"))
        with (self.out / "logs.txt").open("w") as out:
            for log in logs:
                text = log.read_text(errors="replace")
                out.write(f"===== {log.name} (last 20,000 characters)\n{text[-20000:]}\n")
        self.save()
        render(self.out)


def render(out: Path) -> None:
    """fleet.md and fleet.png from out/fleet.json."""
    result = json.loads((out / "fleet.json").read_text())
    md = fleet_report.render_markdown(result)
    (out / "fleet.md").write_text(md)
    runs = result["runs"]
    if runs:
        burst = tuple(runs[0]["burst"])
        if not fleet_report.plot(runs, burst, out / "fleet.png"):
            print("matplotlib is missing: no fleet.png (run --render DIR where it is installed)")
    print(md)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    if not args.out:
        print("bench_fleet: error: --out DIR is required (or --render DIR)", file=sys.stderr)
        return 2
    try:
        prof, extra = settings(args)
    except ValueError as exc:
        print(f"bench_fleet: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = FleetBench(prof, extra, args, out)
    try:
        asyncio.run(bench.run())
    except (RuntimeError, ValueError, OSError) as exc:  # assets or trace: nothing to measure without them
        bench.note(f"stopped: {exc}")
        print(f"bench_fleet: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
