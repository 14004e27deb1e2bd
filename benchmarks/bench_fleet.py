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
   a warm-up closed loop of one full batch (the first run's also measures one worker's token rate),
   then `lorafleet bench --trace CONV --servegen DIR --phases QUIET,BURST,QUIET` (fleet_run.py).
   The rates are set from the first warm-up: quiet = --quiet-factor x one worker's capacity, burst =
   --burst-factor x (more than one worker can serve, so the fleet must grow); the phase lengths are
   shrunk to fit the budget. Every run replays the same plan, greedy.
3. The packing run again with the oldest worker SIGKILLed once two are busy in the burst: lost
   requests, and requests whose tokens differ from the run without the kill (and, as the noise
   floor, between the runs without a kill).
4. One migration between two workers at each --migration-contexts length (fleet_migration.py).
Outputs in --out: fleet.json (settings, machine, every run's samples and requests, summaries),
fleet.md (the tables), fleet.png (GPUs in use over time per run with the request rate), logs.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# The sibling fleet_*.py modules import as top-level modules: run this file as a script.
import fleet_report
from fleet_assets import make_assets
from fleet_plan import RunCosts, burst_window, capacity_rates, replay_seconds, scale_phases, shaped_phases
from fleet_run import RunSpec, Warmup, run_one

from lorafleet.workload import read_azure_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO.parent / "shared" / "traces"
POLICIES = ("packing", "least_loaded", "round_robin")


@dataclass(frozen=True)
class Profile:
    device: str
    dtype: str
    shape: str | None  # make-demo --shape; None = the tiny demo
    distinct_adapters: int
    max_batch_size: int
    engine: tuple[str, ...]
    phases_s: tuple[float, float, float]
    idle_release_s: float
    warmup_s: tuple[float, float]  # first run (measures capacity), later runs
    max_new_tokens: int
    max_prompt_tokens: int
    migration_contexts: tuple[int, ...]
    budget_s: float
    tail_s: float
    sample_every_s: float
    serve_timeout_s: float
    stop_s: float  # estimate until measured


PROFILES = {
    # Two H200s, Llama-2-7B shape. 32 adapter slots of r16 and a 12 GiB host cache per worker, so
    # slots and host memory do not throttle a batch of 32 over the tenants' adapters.
    "gpu": Profile(
        device="cuda",
        dtype="bfloat16",
        shape="llama2-7b",
        distinct_adapters=4,
        max_batch_size=32,
        engine=("max_loras=32", "max_lora_rank=16", f"host_cache_bytes={12 << 30}"),
        phases_s=(10.0, 30.0, 25.0),
        idle_release_s=5.0,
        warmup_s=(10.0, 4.0),
        max_new_tokens=128,
        max_prompt_tokens=1024,
        migration_contexts=(1024, 4096),
        budget_s=510.0,
        tail_s=5.0,
        sample_every_s=0.2,
        serve_timeout_s=300.0,
        stop_s=10.0,
    ),
    # CPU smoke: the tiny demo (512-token context), batch 4 as in `lorafleet demo`.
    "smoke": Profile(
        device="cpu",
        dtype="float32",
        shape=None,
        distinct_adapters=8,
        max_batch_size=4,
        engine=("max_lora_rank=16",),
        phases_s=(4.0, 8.0, 13.0),
        idle_release_s=3.0,
        warmup_s=(5.0, 2.0),
        max_new_tokens=32,
        max_prompt_tokens=128,
        migration_contexts=(128, 448),
        budget_s=420.0,
        tail_s=3.0,
        sample_every_s=0.25,
        serve_timeout_s=180.0,
        stop_s=5.0,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for fleet.json, fleet.md, fleet.png, logs.txt")
    p.add_argument("--render", metavar="DIR", help="only rewrite fleet.md and fleet.png from DIR/fleet.json")
    p.add_argument("--smoke", action="store_true", help="the CPU profile: tiny demo model, short phases")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu with --smoke")
    p.add_argument("--trace", default=str(TRACES / "azure_llm_2023_conv.csv"), help="Azure conv trace CSV")
    p.add_argument("--servegen", default=str(TRACES / "servegen_m_large"), help="ServeGen tenant folder")
    p.add_argument("--trace-start-s", type=float, default=0.0, help="where the slice starts in the trace")
    p.add_argument("--work-dir", default="/tmp/lorafleet-fleetbench", help="model, adapters, server logs")
    p.add_argument("--adapters", type=int, default=100, help="registered adapters (default 100)")
    p.add_argument("--distinct-adapters", type=int, help="of which with their own random weights")
    p.add_argument("--time-budget-s", type=float, help="whole benchmark (default 510 GPU, 420 smoke)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; packing first")
    p.add_argument("--phases-s", help="QUIET,BURST,QUIET seconds before the budget shrinks them")
    p.add_argument("--quiet-factor", type=float, default=0.3, help="quiet rate / one worker's capacity")
    p.add_argument("--burst-factor", type=float, default=1.6, help="burst rate / one worker's capacity")
    p.add_argument("--rates", help="QUIET,BURST requests/s instead of sizing them from the warm-up")
    p.add_argument("--idle-release-s", type=float, help="serve --idle-release-s (default 5 GPU, 3 smoke)")
    p.add_argument("--max-batch-size", type=int, help="engine max_batch_size (default 32 GPU, 4 smoke)")
    p.add_argument("--no-kill", action="store_true", help="skip the worker-kill run")
    p.add_argument("--no-migration", action="store_true", help="skip the migration measurement")
    p.add_argument("--migration-contexts", help="comma-separated context lengths (default 1024,4096 GPU)")
    p.add_argument("--migration-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p


def settings(args: argparse.Namespace) -> tuple[Profile, dict[str, Any]]:
    """The profile with the flags applied, and the flags that are not profile fields."""
    prof = PROFILES["smoke" if args.smoke else "gpu"]
    changes: dict[str, Any] = {}
    if args.device:
        changes["device"] = args.device
        if args.device == "cpu" and not args.smoke:
            changes["dtype"] = "float32"
    for flag, name in (
        ("distinct_adapters", "distinct_adapters"),
        ("time_budget_s", "budget_s"),
        ("idle_release_s", "idle_release_s"),
        ("max_batch_size", "max_batch_size"),
    ):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    if args.phases_s:
        changes["phases_s"] = _floats(args.phases_s, 3, "--phases-s")
    if args.migration_contexts:
        changes["migration_contexts"] = tuple(int(x) for x in _floats(args.migration_contexts, None, "ctx"))
    prof = replace(prof, **changes)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or policies[0] != "packing" or len(set(policies)) != len(policies):
        raise ValueError(
            f"--policies must start with packing and name each policy once, got {args.policies!r}"
        )
    rates = _floats(args.rates, 2, "--rates") if args.rates else None
    for path, what in ((args.trace, "--trace"), (args.servegen, "--servegen")):
        if not Path(path).exists():
            raise ValueError(f"{what} {path} does not exist")
    return prof, {"policies": policies, "rates": rates}


def _floats(text: str, count: int | None, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if (count is not None and len(values) != count) or any(not v > 0 for v in values):
        raise ValueError(f"{flag} takes {count or 'some'} numbers > 0, got {text!r}")
    return values


def machine() -> dict[str, Any]:
    gpus = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "gpus": gpus.splitlines(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


class FleetBench:
    def __init__(self, prof: Profile, extra: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
        self.prof, self.args, self.out = prof, args, out
        self.policies: list[str] = extra["policies"]
        self.rates: tuple[float, ...] | None = extra["rates"]
        self.kill = not args.no_kill
        self.begin = time.monotonic()
        self.work = Path(args.work_dir)
        self.phases: str | None = None
        self.costs: RunCosts | None = None
        self.later_runs_s: list[float] = []  # measured length of each run after the first
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
        )
        self.stage(
            "assets", start, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(assets).items()}
        )
        self.assets = assets
        self.rows = read_azure_trace(self.args.trace)
        for i, policy in enumerate(self.policies):
            if i and not self.fits(f"the {policy} run"):
                continue
            await self.one_run(policy, policy, kill=False)
        if not self.args.no_migration and self.fits("the migration measurement", self.migration_estimate()):
            await self.migration()
        if self.kill and self.phases is not None and self.fits("the kill run"):
            await self.one_run("packing-kill", "packing", kill=True)
            self.compare_kill()
        self.finish()

    def fits(self, what: str, need: float | None = None) -> bool:
        if need is None:  # a run: as long as the longest one after the first, or the estimate
            c = self.costs
            plan_s = burst_window(self.phases)[2] if self.phases else 0.0
            need = (c.serve_start_s + c.warmup_s + plan_s + c.tail_s + c.stop_s) if c else 0.0
            need = max([need, *self.later_runs_s])
        if self.left_s() >= need:
            return True
        self.note(f"skipped {what}: {self.left_s():.0f} s of the budget left, about {need:.0f} s needed")
        return False

    def note(self, text: str) -> None:
        self.log(text)
        self.result["notes"].append(text)
        self.save()

    def stage(self, name: str, start: float, info: Any = None) -> None:
        self.result["stages"][name] = {"seconds": time.monotonic() - start, "info": info}
        self.log(f"{name}: {time.monotonic() - start:.1f} s")
        self.save()

    def spec(self, name: str, policy: str, kill: bool) -> RunSpec:
        prof, a = self.prof, self.assets
        serve = ["--model", str(a.model_dir), "--adapters-dir", str(a.adapters_dir)]
        serve += ["--device", prof.device, "--dtype", prof.dtype, "--workers", "1", "--max-workers", "2"]
        serve += ["--port", "0", "--http-port", "off", "--metrics-port", "off", "--max-queue", "8192"]
        serve += ["--idle-release-s", f"{prof.idle_release_s:g}", "--consolidation-interval-s", "1"]
        serve += ["--drain-timeout-s", "5", "--engine", f"max_batch_size={prof.max_batch_size}"]
        for option in prof.engine:
            serve += ["--engine", option]
        bench = ["--trace", self.args.trace, "--servegen", self.args.servegen]
        bench += ["--trace-start-s", f"{self.args.trace_start_s:g}", "--seed", str(self.args.seed)]
        bench += [
            "--max-new-tokens",
            str(prof.max_new_tokens),
            "--max-prompt-tokens",
            str(prof.max_prompt_tokens),
        ]
        bench += ["--aliases", "0", "--request-timeout", "600"]
        first = self.phases is None
        return RunSpec(
            name=name,
            policy=policy,
            kill=kill,
            serve_args=serve,
            bench_args=bench,
            max_batch_size=prof.max_batch_size,
            warmup_s=prof.warmup_s[0] if first else prof.warmup_s[1],
            tail_s=prof.tail_s,
            sample_every_s=prof.sample_every_s,
            serve_timeout_s=prof.serve_timeout_s,
        )

    async def one_run(self, name: str, policy: str, kill: bool) -> None:
        start = time.monotonic()
        self.log(f"run {name}: starting lorafleet serve --policy {policy}")
        deadline = self.begin + self.prof.budget_s - 5.0
        try:
            record = await run_one(
                self.spec(name, policy, kill),
                self.rows,
                self.work,
                phases=self.phases,
                choose_phases=self.choose_phases,
                burst_of=burst_window,
                deadline=deadline,
            )
        except Exception as exc:  # a failed run is a result: record it and go on with the next
            self.note(f"run {name} failed: {type(exc).__name__}: {exc}")
            return
        record["kill_run"] = kill
        self.result["runs"].append(record)
        if self.costs is not None:
            self.costs = replace(self.costs, stop_s=max(self.costs.stop_s, record["serve_stop_s"]))
        if len(self.result["runs"]) > 1:
            self.later_runs_s.append(time.monotonic() - start)
        self.stage(f"run {name}", start, {"serve_started_s": record["serve_started_s"]})

    def choose_phases(self, warm: Warmup, started_s: float) -> str:
        """Rates from one worker's capacity, phase lengths from the budget (see the module doc)."""
        prof = self.prof
        outputs = [max(1, min(r.generated_tokens, prof.max_new_tokens)) for r in self.rows[:2000]]
        mean_out = statistics.fmean(outputs)
        capacity, quiet, burst = capacity_rates(
            warm.tokens_per_s, mean_out, self.args.quiet_factor, self.args.burst_factor
        )
        if self.rates is not None:
            quiet, burst = self.rates
        self.costs = RunCosts(started_s, prof.warmup_s[1] + 2.0, prof.tail_s, prof.stop_s)
        runs_after = len(self.policies) - 1 + int(self.kill)
        plan_s = replay_seconds(self.left_s(), runs_after, self.costs, self.migration_estimate(), 10.0)
        if self.kill and plan_s < 0.5 * sum(prof.phases_s):
            self.kill = False  # the policy comparison comes first
            self.note(f"budget: {plan_s:.0f} s per replay with the kill run; the kill run is dropped")
            plan_s = replay_seconds(
                self.left_s(), runs_after - 1, self.costs, self.migration_estimate(), 10.0
            )
        seconds = scale_phases(prof.phases_s, plan_s, (prof.phases_s[0] / 2, prof.idle_release_s + 10.0))
        if min(seconds) < 1.0:
            self.note(f"budget: only {plan_s:.0f} s per replay; phases of at least 1 s each instead")
            seconds = tuple(max(1.0, x) for x in seconds)
        self.phases = shaped_phases(quiet, burst, seconds)
        self.result["sizing"] = {
            "warmup_tokens_per_s": warm.tokens_per_s,
            "warmup_spread": warm.spread,
            "mean_output_tokens": mean_out,
            "one_worker_requests_per_s": capacity,
            "rates_given": self.rates is not None,
            "plan_s_budget": plan_s,
            "phases": self.phases,
        }
        self.log(
            f"one worker: {warm.tokens_per_s:.0f} tokens/s = {capacity:.2f} requests/s; phases {self.phases}"
        )
        self.save()
        return self.phases

    def migration_estimate(self) -> float:
        if self.args.no_migration:
            return 0.0
        start = self.costs.serve_start_s if self.costs else 60.0
        per = 1.5 if self.prof.device == "cuda" else 3.0
        return start + 15.0 + per * len(self.prof.migration_contexts) * (2 + self.args.migration_repeats)

    def compare_kill(self) -> None:
        runs = {r["name"]: r for r in self.result["runs"]}
        ref, killed = runs.get("packing"), runs.get("packing-kill")
        if ref is None or killed is None:
            return
        out = fleet_report.compare_tokens(ref, killed)
        out.update(killed.get("kill") or {"at_s": None, "pid": None, "running_at_kill": 0})
        out["resumed_after_fault"] = fleet_report.counter_delta(killed, "resumed_after_fault")
        out["worker_deaths"] = fleet_report.counter_delta(killed, "worker_deaths")
        out["noise_floor"] = [
            fleet_report.compare_tokens(ref, runs[p]) for p in self.policies[1:] if p in runs
        ]
        self.result["kill"] = out
        self.save()

    async def migration(self) -> None:
        from fleet_migration import measure_migrations

        start = time.monotonic()
        self.log("migration: an in-process fleet of two workers")
        try:
            self.result["migration"] = await asyncio.wait_for(
                measure_migrations(
                    model_dir=str(self.assets.model_dir),
                    adapter_dir=str(self.assets.adapters_dir / "adapter-0"),
                    device=self.prof.device,
                    dtype=self.prof.dtype,
                    engine=_engine_dict(self.prof),
                    contexts=list(self.prof.migration_contexts),
                    warmups=2,
                    repeats=self.args.migration_repeats,
                    seed=self.args.seed,
                ),
                max(10.0, self.left_s()),
            )
        except Exception as exc:
            self.note(f"migration measurement failed: {type(exc).__name__}: {exc}")
            return
        self.stage("migration", start)

    def finish(self) -> None:
        logs = sorted(self.work.glob("*.log"))
        with (self.out / "logs.txt").open("w") as out:
            for log in logs:
                text = log.read_text(errors="replace")
                out.write(f"===== {log.name} (last 20,000 characters)\n{text[-20000:]}\n")
        self.save()
        render(self.out)


def _engine_dict(prof: Profile) -> dict[str, Any]:
    import yaml

    options = {"max_batch_size": prof.max_batch_size}
    for option in prof.engine:
        key, _, value = option.partition("=")
        options[key] = yaml.safe_load(value)
    return options


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
    args = build_parser().parse_args(argv)
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
    asyncio.run(bench.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
