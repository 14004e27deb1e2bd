"""`lorafleet sim`: replay a workload through the simulator and write its results.

    lorafleet sim --trace FILE --profile NAME_OR_FILE --policy P --max-gpus N --out DIR [--json]

Writes DIR/requests.csv (per request), DIR/summary.json, DIR/gpus.png and DIR/latency_cdf.png;
prints the summary (or, with --compare, one table over every policy) and, with --json, one JSON
object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from lorafleet.bench.workload import POPULARITIES
from lorafleet.scheduler.fleet_config import POLICIES
from lorafleet.sim.profile import LatencyProfile, load_profile
from lorafleet.sim.report import Slo, format_compare, format_summary, summarize, write_requests_csv
from lorafleet.sim.sim_types import SimConfig, SimRequest, SimResult
from lorafleet.sim.simulator import Simulator
from lorafleet.sim.workloads import (
    WorkloadInfo,
    build_workload,
    load_rows,
    servegen_popularity,
    synthetic_rows,
)

# The comparison of the study: packing with and without migration, and the spreading baselines.
COMPARE = (
    ("packing", True),
    ("packing", False),
    ("least_loaded", True),
    ("round_robin", True),
    ("random", True),
)


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH token counts, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--trace",
        help="Azure LLM CSV, ServeGen folder, or CSV with timestamp_s,prompt_tokens,output_tokens[,adapter]",
    )
    src.add_argument("--synthetic", action="store_true", help="Punica's Poisson arrivals with a cosine rate")
    p.add_argument("--profile", required=True, help="shipped profile name (cpu-demo, ...) or a profile YAML")
    p.add_argument("--policy", choices=POLICIES, default="packing")
    p.add_argument("--no-migration", action="store_true", help="consolidation moves nothing (still releases)")
    p.add_argument("--max-gpus", type=int, required=True, help="most workers the fleet may grow to")
    p.add_argument("--min-gpus", type=int, default=1)
    p.add_argument(
        "--kv-blocks", type=int, default=None, help="KV cache blocks per worker (default: the profile's)"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="sequences per worker step (default and most: the profile's, whose step table ends there)",
    )
    p.add_argument(
        "--pack-batch-target",
        type=int,
        default=None,
        metavar="N",
        help="placement fills a worker only to N sequences, the engine's headroom takes the overflow "
        "while the fleet grows (every policy; default: the batch limit)",
    )
    p.add_argument("--out", required=True, help="folder for requests.csv, summary.json and the plots")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, last line")
    p.add_argument("--compare", action="store_true", help="run every policy on the workload; one table")
    p.add_argument(
        "--popularity",
        default="skewed",
        help=f"adapters of requests without one: {'|'.join(POPULARITIES)} or servegen:FOLDER (tenant shares)",
    )
    p.add_argument("--adapters", type=int, default=None, help="number of adapters (default: Punica's rule)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="X times the requests over the same span")
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch every timestamp by X")
    p.add_argument("--servegen-start-s", type=float, default=0.0, help="ServeGen: first second to replay")
    p.add_argument("--servegen-span-s", type=float, default=3600.0, help="ServeGen: seconds to replay")
    p.add_argument("--rate", type=float, default=5.0, help="--synthetic: mean requests per second")
    p.add_argument("--duration", type=float, default=600.0, help="--synthetic: seconds")
    p.add_argument("--period", type=float, default=600.0, help="--synthetic: seconds per cosine period")
    p.add_argument("--amplitude", type=float, default=0.8, help="--synthetic: rate swing, 0..1")
    p.add_argument("--prompt-len", type=_range, default=(64, 1024), help="synthetic/ServeGen prompt LOW:HIGH")
    p.add_argument("--output-len", type=_range, default=(16, 512), help="synthetic/ServeGen output LOW:HIGH")
    p.add_argument("--slo-ttft-s", type=float, default=2.0, help="SLO: time to first token (default 2 s)")
    p.add_argument("--slo-tpot-s", type=float, default=0.2, help="SLO: time per output token (default 0.2 s)")
    p.add_argument("--idle-release-s", type=float, default=None, help="default: the runtime's")
    p.add_argument("--consolidation-interval-s", type=float, default=None, help="default: the runtime's")
    p.add_argument("--placement-interval-s", type=float, default=0.0, help="batch admissions (0 = at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_workload(args: argparse.Namespace, profile: LatencyProfile) -> tuple[list[SimRequest], WorkloadInfo]:
    if args.synthetic:
        rows = synthetic_rows(
            rate=args.rate,
            duration_s=args.duration,
            period_s=args.period,
            amplitude=args.amplitude,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            seed=args.seed,
        )
        source = f"synthetic {args.rate}/s over {args.duration} s"
    else:
        rows = load_rows(
            args.trace,
            servegen_start_s=args.servegen_start_s,
            servegen_span_s=args.servegen_span_s,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            seed=args.seed,
        )
        source = args.trace
    tenants = None
    popularity = args.popularity
    if popularity.startswith("servegen:"):
        tenants = servegen_popularity(Path(popularity[9:]), args.servegen_start_s, args.servegen_span_s)
    elif popularity not in POPULARITIES:
        raise ValueError(f"--popularity must be one of {', '.join(POPULARITIES)} or servegen:FOLDER")
    return build_workload(
        rows,
        source=source,
        popularity=popularity,
        num_adapters=args.adapters,
        max_model_len=profile.engine.max_model_len,
        rate_scale=args.rate_scale,
        time_scale=args.time_scale,
        tenants=tenants,
        seed=args.seed,
    )


def sim_config(args: argparse.Namespace, policy: str, migrations: bool) -> SimConfig:
    extra: dict[str, Any] = {}
    if args.idle_release_s is not None:
        extra["idle_release_s"] = args.idle_release_s
    if args.consolidation_interval_s is not None:
        extra["consolidation_interval_s"] = args.consolidation_interval_s
    return SimConfig(
        policy=policy,
        pack_batch_target=args.pack_batch_target,
        max_gpus=args.max_gpus,
        min_gpus=args.min_gpus,
        migrations=migrations,
        placement_interval_s=args.placement_interval_s,
        seed=args.seed,
        **extra,
    )


def simulate(
    config: SimConfig, profile: LatencyProfile, requests: list[SimRequest], *, progress: bool
) -> SimResult:
    bar = None
    if progress:
        from lorafleet.bench.progress import ProgressBar

        bar = ProgressBar(len(requests), label=config.label)
    on_done = (lambda rec: bar.advance(rec.output_tokens, error=bool(rec.rejected))) if bar else None
    start = time.perf_counter()
    try:
        result = Simulator(config, profile, requests, on_done=on_done).run()
    finally:
        if bar is not None:
            bar.close()
    result.sim_wall_s = time.perf_counter() - start
    return result


def run_cli(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    if args.kv_blocks is not None:  # the same worker with another KV capacity (another GPU memory)
        engine = dataclasses.replace(profile.engine, num_kv_blocks=args.kv_blocks)
        profile = dataclasses.replace(profile, engine=engine)
    if args.max_batch_size is not None:  # the same worker run with a lower batch limit
        most = profile.engine.max_batch_size
        if not 1 <= args.max_batch_size <= most:
            raise ValueError(
                f"--max-batch-size must be in [1, {most}] (the profile {profile.name!r} measured steps "
                f"up to {most} sequences), got {args.max_batch_size}"
            )
        engine = dataclasses.replace(profile.engine, max_batch_size=args.max_batch_size)
        profile = dataclasses.replace(profile, engine=engine)
    target = args.pack_batch_target
    if target is not None and not 1 <= target <= profile.engine.max_batch_size:
        raise ValueError(
            f"--pack-batch-target must be in [1, {profile.engine.max_batch_size}] (the worker's batch "
            f"limit), got {target}"
        )
    slo = Slo(args.slo_ttft_s, args.slo_tpot_s)
    runs = [(args.policy, not args.no_migration)]
    if args.compare:
        runs += [r for r in COMPARE if r != runs[0]]
    configs = [sim_config(args, p, m) for p, m in runs]  # validated before the (slow) trace load
    requests, info = load_workload(args, profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [simulate(c, profile, requests, progress=not args.quiet) for c in configs]
    summaries = [summarize(r, slo) for r in results]
    for s in summaries:
        s.update(workload=info.source, clamped=info.clamped, adapters=info.adapters)
    main = summaries[0]
    if len(results) == 1:
        write_requests_csv(results[0], out / "requests.csv")
    else:
        for r in results:
            write_requests_csv(r, out / f"requests-{r.config.label}.csv")
    if not args.no_plots:
        from lorafleet.sim.plots import write_plots

        write_plots(results, out)
    record: dict[str, Any] = dict(main)
    if args.compare:
        record["compare"] = {s["policy"]: s for s in summaries}
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"workload: {info.source}: {info.requests} requests, {info.adapters} adapters, "
        f"{info.clamped} clamped to {profile.engine.max_model_len} tokens"
    )
    print(format_compare(summaries) if args.compare else format_summary(main))
    print(f"results in {out}/")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(record))
    return 0


# ---------------------------------------------------------------------- lorafleet profile


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model folder (Hugging Face layout)")
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda by default")
    p.add_argument("--adapters-dir", default=None, help="PEFT adapters to load (default: MODEL/adapters)")
    p.add_argument("--engine", action="append", metavar="KEY=VALUE", help="an EngineConfig field; repeatable")
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=int, default=8, help="timed steps per grid point")
    p.add_argument("--no-ray-start", action="store_true", help="time Engine start-up only, not a Ray actor")
    p.add_argument(
        "--no-serving", action="store_true", help="skip measuring the serving stack's overheads (Ray, gRPC)"
    )
    p.add_argument("--out", required=True, help="profile YAML to write")


def run_profile_cli(args: argparse.Namespace) -> int:
    import yaml

    from lorafleet.config import parse_engine_option
    from lorafleet.sim.profile import parse_profile
    from lorafleet.sim.profiler import measure_profile

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there (expected a Hugging Face model folder)")
    adapters = args.adapters_dir
    if adapters is None and (model / "adapters").is_dir():
        adapters = str(model / "adapters")
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError("--warmup must be >= 0 and --repeats >= 1")
    out = Path(args.out)
    profile = measure_profile(
        str(model),
        device=args.device,
        dtype=args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        engine_options=dict(parse_engine_option(s) for s in args.engine or ()),
        adapters_dir=adapters,
        name=args.name or out.stem,
        warmup=args.warmup,
        repeats=args.repeats,
        ray_start=not args.no_ray_start,
        serving=not args.no_serving,
        log=lambda line: print(line, file=sys.stderr),
    )
    mapping = profile.to_mapping()
    parse_profile(mapping, str(out))  # what we write must load back
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Latency profile for lorafleet sim, measured by `lorafleet profile` (see docs/simulator.md).\n"
    out.write_text(header + yaml.safe_dump(mapping, sort_keys=False, width=110, default_flow_style=None))
    base = ", ".join(f"{b}: {s * 1e3:.2f}" for b, s in zip(profile.decode_batch, profile.decode_base_s))
    print(f"wrote {out}: step base (ms) by decode seqs {{{base}}}; start-up {profile.worker_start_s:.2f} s")
    return 0
