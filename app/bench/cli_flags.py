"""`lorafleet bench`'s flags, and the request plan they describe.

`add_arguments` declares every flag of the command; `build_plan` turns the workload flags into the
planned requests: synthetic Poisson arrivals, or an Azure trace replay (started `--trace-start-s`
into it, shaped by `--phases`), adapters by ServeGen tenant with `--servegen`. runner.py sends the
plan.
"""

from __future__ import annotations

import argparse

from lorafleet.bench.trace_phases import assign_tenants, parse_phases, phased_rows, slice_rows, tenant_weights
from lorafleet.bench.workload import (
    POPULARITIES,
    PlannedRequest,
    TraceRow,
    read_azure_trace,
    synthetic_workload,
    trace_workload,
)
from lorafleet.client.flags import add_client_auth_flags


def _int_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    add_client_auth_flags(p)  # the token also goes to --http as `Authorization: Bearer`
    p.add_argument(
        "--http",
        metavar="URL",
        default=None,
        help="send the requests through the OpenAI-compatible HTTP API at URL (e.g. http://127.0.0.1:8000);"
        " status and adapters still use --server",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    source.add_argument("--synthetic", action="store_true", help="Poisson arrivals, Punica popularities")
    p.add_argument(
        "--popularity", choices=POPULARITIES, default="skewed", help="adapter mix (default skewed)"
    )
    p.add_argument("--rate", type=float, default=None, help="requests/s (trace: rescales its timeline)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals to send")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--prompt-len", type=_int_range, default=(8, 64), help="synthetic: N or LOW-HIGH")
    p.add_argument("--output-len", type=_int_range, default=(8, 32), help="synthetic: N or LOW-HIGH")
    p.add_argument("--max-new-tokens", type=int, default=64, help="trace: cap on generated tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="trace: cap on prompt tokens")
    p.add_argument(
        "--phases",
        metavar="RATE:SECONDS,...",
        default=None,
        help="trace: replay consecutive requests phase by phase, each phase's timestamps compressed "
        "to its rate (e.g. 0.5:10,4:30,0.5:20 = quiet, burst, quiet); not with --rate/--duration",
    )
    p.add_argument("--trace-start-s", type=float, default=0.0, help="trace: start this far into it")
    p.add_argument(
        "--servegen",
        metavar="DIR",
        default=None,
        help="adapters by ServeGen tenant (chunk-<client>-trace.csv files): the k-th tenant by request "
        "share becomes the k-th adapter, drawn with its share (replaces --popularity)",
    )
    p.add_argument("--servegen-start-s", type=float, default=0.0, help="window of the tenant shares")
    p.add_argument("--servegen-span-s", type=float, default=86400.0, help="window length (default one day)")
    p.add_argument("--aliases", type=int, default=256, help="adapter aliases the bench may register")
    p.add_argument("--base-model", action="store_true", help="send every request to the base model")
    p.add_argument("--request-timeout", type=float, default=300.0, help="deadline of each request (s)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="wait this long for the server (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-progress", action="store_true")


def build_plan(
    args: argparse.Namespace, max_context_tokens: int, rows: list[TraceRow] | None = None
) -> tuple[list[PlannedRequest], int]:
    plan, clamped = _base_plan(args, max_context_tokens, rows)
    if args.servegen is not None:
        _, weights = tenant_weights(args.servegen, args.servegen_start_s, args.servegen_span_s)
        plan = assign_tenants(plan, weights, args.seed)
    return plan, clamped


def _base_plan(
    args: argparse.Namespace, max_context_tokens: int, rows: list[TraceRow] | None
) -> tuple[list[PlannedRequest], int]:
    if args.synthetic:
        if args.phases is not None:
            raise ValueError("--phases shapes a trace replay; pass --trace")
        plan = synthetic_workload(
            popularity=args.popularity,
            rate=args.rate if args.rate is not None else 4.0,
            duration_s=args.duration if args.duration is not None else 10.0,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            max_requests=args.max_requests,
            seed=args.seed,
        )
        too_long = [p for p in plan if p.prompt_len + p.max_new_tokens >= max_context_tokens]
        if too_long:
            raise ValueError(
                f"--prompt-len + --output-len reach {too_long[0].prompt_len + too_long[0].max_new_tokens} "
                f"tokens; the model's context is {max_context_tokens}"
            )
        return plan, 0
    if rows is None:
        rows = read_azure_trace(args.trace)
    rate, duration = args.rate, args.duration
    if args.trace_start_s:
        rows = slice_rows(rows, args.trace_start_s)
    if args.phases is not None:
        if rate is not None or duration is not None:
            raise ValueError("--phases sets the rate and length of the replay; drop --rate and --duration")
        rows = phased_rows(rows, parse_phases(args.phases))
    plan, clamped = trace_workload(
        rows,
        popularity=args.popularity,
        rate=rate,
        duration_s=duration,
        max_context_tokens=max_context_tokens,
        max_new_tokens_cap=args.max_new_tokens,
        max_prompt_cap=args.max_prompt_tokens,
        seed=args.seed,
    )
    if args.max_requests is not None:
        plan = plan[: args.max_requests]
    return plan, clamped
