"""The `lorafleet` command: serve, generate, status, adapters, bench, demo, sim, profile, make-demo,
selfcheck.

User errors (bad flags, unreachable server, a gRPC error status) print one clear line to stderr
and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from lorafleet import __version__
from lorafleet.client.flags import add_client_auth_flags, client_kwargs
from lorafleet.scheduler.fleet_config import DEVICES, DTYPES, POLICIES
from lorafleet.serving.auth import API_KEYS_ENV

DEFAULT_SERVER = os.environ.get("LORAFLEET_SERVER", "127.0.0.1:50051")
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; printed as `lorafleet: error: ...` without a traceback."""


METRICS_OFF = "off"


def _port_or_off(text: str) -> int | str:
    if text.lower() in ("off", "none", "no"):
        return METRICS_OFF
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids like 1,2,3, got {text!r}"
        ) from None
    return ids


def _add_server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"HOST:PORT of a lorafleet server (default {DEFAULT_SERVER})"
    )
    p.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    add_client_auth_flags(p)


def _add_serve_parser(sub: Any) -> None:
    # dest == ServeConfig field name for every flag (tests check the 1:1 mapping); default None
    # means "not given", so YAML values survive unless a flag overrides them.
    p = sub.add_parser("serve", help="serve a model and its adapters over gRPC and OpenAI-compatible HTTP")
    p.add_argument("--config", help="YAML file with any of the settings below (flags win)")
    p.add_argument("--model", help="base model folder (Hugging Face layout)")
    p.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=DIR", help="repeatable")
    p.add_argument("--adapters-dir", help="register every adapter sub-folder of DIR under its folder name")
    p.add_argument(
        "--adapter-root",
        dest="adapter_roots",
        action="append",
        metavar="DIR",
        help="repeatable: adapters registered through the API must lie in one of these folders "
        "(default: --adapters-dir and the folders of the --adapter directories)",
    )
    p.add_argument("--workers", type=int, help="workers started at launch (default 1)")
    p.add_argument("--max-workers", type=int, help="most workers the fleet may grow to (default --workers)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=_port_or_off, help="Prometheus port (default 9400; 'off')")
    p.add_argument(
        "--metrics-host", help="address of /metrics (default 127.0.0.1, even when --host is not loopback)"
    )
    p.add_argument(
        "--api-keys-file",
        metavar="FILE",
        help="`ROLE TOKEN` lines (ROLE client or admin) turn bearer-token auth on for gRPC, HTTP and "
        f"/metrics (default: ${API_KEYS_ENV}); see docs/security.md",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: gRPC over TLS (needs --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", metavar="FILE", help="mTLS: require client certificates signed by this PEM CA"
    )
    p.add_argument(
        "--http-port", type=_port_or_off, help="OpenAI-compatible HTTP API port (default 8000; 'off')"
    )
    p.add_argument(
        "--ray-address",
        help="join this Ray cluster ('auto' or HOST:PORT); default: always a new local Ray "
        "(RAY_ADDRESS and clusters from `ray start` are used only with 'auto')",
    )
    p.add_argument(
        "--ray-connect-timeout-s", type=float, help="fail if Ray is not started / joined by then (default 60)"
    )
    p.add_argument(
        "--ray-lost-timeout-s",
        type=float,
        help="Ray's GCS unreachable this long: fail requests UNAVAILABLE and exit 1 (default 15)",
    )
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument(
        "--pack-batch-target",
        type=int,
        metavar="N",
        help="placement fills a worker only to N sequences; past it the fleet grows and the engine's "
        "headroom takes the overflow meanwhile (default: the engine's max_batch_size)",
    )
    p.add_argument("--max-queue", type=int, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--consolidation-interval-s", type=float)
    p.add_argument("--idle-release-s", type=float)
    p.add_argument("--drain-timeout-s", type=float, help="how long Ctrl-C waits for running requests")
    p.add_argument("--metrics-top-adapters", type=int, help="per-adapter metric series kept (rest: 'other')")
    p.add_argument("--engine", action="append", metavar="KEY=VALUE", help="an EngineConfig field; repeatable")
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")


def build_parser() -> argparse.ArgumentParser:
    from lorafleet.bench import cli_flags as bench_flags
    from lorafleet.demo import runner as demo

    parser = argparse.ArgumentParser(
        prog="lorafleet", description="Serve thousands of LoRA adapters of one base model on a small fleet."
    )
    parser.add_argument("--version", action="version", version=f"lorafleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve_parser(sub)

    p = sub.add_parser("generate", help="stream one generation from a server")
    _add_server_flag(p)
    p.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--request-id", default=None)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    p = sub.add_parser("status", help="show the fleet's workers, queue and counters")
    _add_server_flag(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("adapters", help="list, register or unregister adapters")
    adapters = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = adapters.add_parser("list", help="registered adapters")
    _add_server_flag(q)
    q.add_argument("--json", action="store_true")
    q = adapters.add_parser("register", help="register an adapter folder under a name")
    _add_server_flag(q)
    q.add_argument("name")
    q.add_argument("path", help="PEFT adapter folder, as the server's workers see it")
    q = adapters.add_parser("unregister", help="forget an adapter")
    _add_server_flag(q)
    q.add_argument("name")

    bench_flags.add_arguments(sub.add_parser("bench", help="load-test a server (trace replay or synthetic)"))
    demo.add_arguments(sub.add_parser("demo", help="the whole system on this machine in about a minute"))

    from lorafleet.sim import cli as sim_cli

    sim_cli.add_arguments(sub.add_parser("sim", help="simulate a fleet on a trace with a measured profile"))
    sim_cli.add_profile_arguments(
        sub.add_parser("profile", help="measure a latency profile for `lorafleet sim` on a real engine")
    )

    p = sub.add_parser("make-demo", help="write a random demo model and adapters into a folder")
    p.add_argument("out_dir")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--shape",
        default=None,
        help="a real model shape (llama2-7b, llama3-8b; tiny) as sharded safetensors with rank "
        "--adapter-rank adapters on every projection; default: the mixed-adapter tiny demo",
    )
    p.add_argument("--dtype", default="bfloat16", help="weights' dtype with --shape (default bfloat16)")
    p.add_argument("--adapter-rank", type=int, default=16, help="adapter rank with --shape (default 16)")
    p.add_argument("--max-shard-mb", type=int, default=5120, help="shard size with --shape (default 5120)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where --shape draws its random weights (cuda: seconds instead of minutes for 7B)",
    )

    p = sub.add_parser("selfcheck", help="check the SGMV kernels against a float64 reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


# ---------------------------------------------------------------------- commands


def serve_config(args: argparse.Namespace) -> Any:
    """The ServeConfig of `serve`'s flags over its --config YAML (and LORAFLEET_API_KEYS_FILE)."""
    from lorafleet.config import ServeConfig, parse_adapter_spec, parse_engine_option

    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in ServeConfig.field_names()}
    if args.adapters:
        overrides["adapters"] = tuple(parse_adapter_spec(s) for s in args.adapters)
    if args.adapter_roots:
        overrides["adapter_roots"] = tuple(args.adapter_roots)
    if args.api_keys_file is None and os.environ.get(API_KEYS_ENV):
        overrides["api_keys_file"] = os.environ[API_KEYS_ENV]  # the flag wins over the variable
    if args.engine:
        overrides["engine"] = dict(parse_engine_option(s) for s in args.engine)
    switched_off = [name for name in ("metrics_port", "http_port") if getattr(args, name) == METRICS_OFF]
    for name in switched_off:
        overrides[name] = None  # None = "not given" to load(); switched off below
    config = ServeConfig.load(args.config, overrides)
    if switched_off:
        config = dataclasses.replace(config, **dict.fromkeys(switched_off))
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from lorafleet.serving.serve import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = serve_config(args)

    def ready(api: Any) -> None:
        http = f"; OpenAI API at http://{api.host}:{api.http_port}/v1" if api.http_port is not None else ""
        metrics = f"http://{api.metrics_host}:{api.metrics_port}/metrics"
        where = f"; metrics at {metrics}" if api.metrics_port else ""
        print(f"lorafleet: serving {config.model} on {api.address}{http}{where}", flush=True)

    asyncio.run(serve(config, on_ready=ready))
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos")
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.stop:
        values["stop"] = list(args.stop)
    return values


def cmd_generate(args: argparse.Namespace) -> int:
    from lorafleet.client.grpc_client import Client
    from lorafleet.serving.api_types import GenerateResult

    prompt: Any = args.prompt if args.prompt is not None else args.prompt_ids
    with Client(args.server, timeout=args.timeout, **client_kwargs(args)) as client:
        chunks = []
        for chunk in client.stream(
            prompt, adapter=args.adapter, sampling=_sampling(args), request_id=args.request_id
        ):
            chunks.append(chunk)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        result = GenerateResult.from_chunks(chunks)
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "token_ids": list(result.token_ids),
                    "text": result.text,
                    "finish_reason": result.finish_reason.value,
                    "usage": vars(result.usage),
                }
            )
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.finish_reason.value}: {result.usage.generated_tokens} tokens, "
            f"first after {result.usage.time_to_first_token_s * 1000:.0f} ms, "
            f"total {result.usage.total_time_s:.2f} s]",
            file=sys.stderr,
        )
    if result.finish_reason.value == "abort":
        # A stream the server cut short is a failure to a script, even though the call "worked".
        print(
            f"lorafleet: error: request {result.request_id} was aborted by the server after "
            f"{result.usage.generated_tokens} tokens",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lorafleet.bench.report import format_status
    from lorafleet.client.grpc_client import Client

    with Client(args.server, timeout=args.timeout or 10.0, **client_kwargs(args)) as client:
        status = client.status()
    if args.json:
        print(json.dumps(dataclasses.asdict(status)))
    else:
        print(format_status(status))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from lorafleet.client.grpc_client import Client

    with Client(args.server, timeout=args.timeout or 30.0, **client_kwargs(args)) as client:
        if args.action == "list":
            adapters = client.list_adapters()
            if args.json:
                print(json.dumps(adapters))
            elif not adapters:
                print("(no adapters registered)")
            else:
                width = max(len(n) for n in adapters)
                for name, path in sorted(adapters.items()):
                    print(f"{name:<{width}}  {path}")
        elif args.action == "register":
            client.register_adapter(args.name, args.path)
            print(f"registered {args.name} -> {args.path}")
        else:
            client.unregister_adapter(args.name)
            print(f"unregistered {args.name}")
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from lorafleet.worker.demo_assets import make_demo

    if args.device != "cpu":
        import torch

        if args.shape is None:
            raise ValueError("--device applies to --shape models only (the tiny demo is drawn on the CPU)")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available here")
    if args.shape is not None:
        from lorafleet.worker.demo_shapes import describe, make_shaped_demo

        if args.max_shard_mb < 1:
            raise UserError(f"--max-shard-mb must be >= 1, got {args.max_shard_mb}")
        assets = make_shaped_demo(
            args.out_dir,
            args.shape,
            num_adapters=args.num_adapters,
            adapter_rank=args.adapter_rank,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_mb * 1024**2,
            seed=args.seed,
            overwrite=args.overwrite,
            device=args.device,
        )
        print(f"shape {args.shape}: {describe(args.shape)}; {args.dtype}")
    else:
        assets = make_demo(
            args.out_dir, num_adapters=args.num_adapters, seed=args.seed, overwrite=args.overwrite
        )
    print(f"model: {assets.model_dir}")
    for name, path in assets.adapters.items():
        print(f"adapter {name}: {path}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from lorafleet.kernels.selfcheck import run_selfcheck

    results = run_selfcheck(args.device)
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        print(
            f"{mark} {r.backend:<6} {r.dtype:<8} {r.popularity:<9} "
            f"rel error {r.rel_error:.2e} (tol {r.tolerance:.0e})"
        )
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


def _dispatch(args: argparse.Namespace) -> int:
    from lorafleet.bench import runner as bench
    from lorafleet.demo import runner as demo
    from lorafleet.sim import cli as sim_cli

    commands = {
        "serve": cmd_serve,
        "generate": cmd_generate,
        "status": cmd_status,
        "adapters": cmd_adapters,
        "bench": bench.run_cli,
        "demo": demo.run_cli,
        "sim": sim_cli.run_cli,
        "profile": sim_cli.run_profile_cli,
        "make-demo": cmd_make_demo,
        "selfcheck": cmd_selfcheck,
    }
    return commands[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lorafleet.client.grpc_client import ApiError
    from lorafleet.scheduler.errors import FleetError

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("lorafleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ApiError as exc:
        hint = ""
        if exc.code.name == "UNAVAILABLE" and getattr(args, "tls_ca", None) is None:
            hint = " (if the server uses TLS, pass --tls-ca)"  # a TLS server just closes a plain socket
        print(f"lorafleet: error from {getattr(args, 'server', 'the server')}: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except (
        UserError,
        FleetError,
        ValueError,
        KeyError,
        TimeoutError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"lorafleet: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"lorafleet: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
