"""Bad input, one table: each case against the gRPC API (typed client or raw bytes) or the CLI, with
the status (or exit code) and a fragment of the message it must get. After every case the server
must still serve; nothing may crash or hang."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from lorafleet.cli import main
from lorafleet.client.grpc_client import ApiError, Client

from .conftest import MAX_CONTEXT, VOCAB

INV, NF, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION


Call = Callable[[Client, str], Any]  # (typed client, server address)


def _gen(prompt: Any, **kwargs: Any) -> Call:
    return lambda client, _: client.generate(prompt, **kwargs)


def _sampling(**values: Any) -> Call:
    return _gen([1, 2, 3], sampling=values)


GRPC_CASES: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("empty token prompt", _gen([]), INV, "empty"),
    ("empty text prompt", _gen(""), INV, "empty"),
    ("negative token id", _gen([1, -5]), INV, "-5"),
    ("token id past the vocabulary", _gen([1, VOCAB]), INV, str(VOCAB)),
    ("prompt longer than the context", _gen([1] * (MAX_CONTEXT + 1)), INV, "context"),
    ("max_new_tokens 0", _sampling(max_new_tokens=0), INV, "max_new_tokens"),
    ("max_new_tokens negative", _sampling(max_new_tokens=-3), INV, "max_new_tokens"),
    ("temperature negative", _sampling(temperature=-1.0), INV, "temperature"),
    ("temperature infinite", _sampling(temperature=math.inf), INV, "temperature"),
    ("temperature NaN", _sampling(temperature=math.nan), INV, "temperature"),
    ("top_p 0", _sampling(top_p=0.0), INV, "top_p"),
    ("top_p above 1", _sampling(top_p=1.5), INV, "top_p"),
    ("top_p NaN", _sampling(top_p=math.nan), INV, "top_p"),
    ("top_k negative", _sampling(top_k=-1), INV, "top_k"),
    ("seed negative", _sampling(seed=-1), INV, "seed"),
    ("stop token negative", _sampling(stop_token_ids=[-1]), INV, "stop"),
    ("stop token past the vocabulary", _sampling(stop_token_ids=[VOCAB + 7]), INV, "stop"),
    ("empty stop string", _sampling(stop=[""]), INV, "stop"),
    ("unknown adapter", _gen([1, 2], adapter="no-such-adapter"), NF, "no-such-adapter"),
    ("register: empty name", lambda c, _: c.register_adapter("", "/adapters/x"), INV, "name"),
    ("register: empty path", lambda c, _: c.register_adapter("x", ""), INV, "path"),
    (
        "register: not an adapter folder",
        lambda c, _: c.register_adapter("x", "/elsewhere"),
        INV,
        "adapter_config",
    ),
    (
        "register: re-point a name in use",
        lambda c, _: c.register_adapter("busy-1", "/adapters/v2"),
        FP,
        "in use",
    ),
    ("unregister: unknown name", lambda c, _: c.unregister_adapter("nobody"), NF, "nobody"),
]


def _raw(method: str, payload: bytes, streaming: bool = False) -> Call:
    def call(_: Client, address: str) -> Any:
        with grpc.insecure_channel(address) as channel:
            kind = channel.unary_stream if streaming else channel.unary_unary
            stub = kind(f"/lorafleet.v1.LoraFleet/{method}", lambda b: b, lambda b: b)
            try:
                result = stub(payload, timeout=10)
                return list(result) if streaming else result
            except grpc.RpcError as exc:
                raise ApiError(exc.code(), exc.details() or "") from None

    return call


GRPC_CASES += [
    ("raw: garbage generate", _raw("Generate", b"\xff\xff\xff\xff", True), INV, "not a valid protobuf"),
    ("raw: invalid UTF-8 adapter", _raw("Generate", b"\x1a\x02\xff\xfe", True), INV, "not a valid protobuf"),
    ("raw: garbage register", _raw("RegisterAdapter", b"\xff\xff\xff"), INV, "not a valid protobuf"),
    ("raw: invalid UTF-8 name", _raw("RegisterAdapter", b"\x0a\x02\xc3\x28"), INV, "not a valid protobuf"),
]

# (argv after the server flag, exit code, stderr fragment)
CLI_CASES: list[tuple[list[str], int, str]] = [
    (["generate", "--prompt-ids", "1,2", "--max-new-tokens", "10000000000"], 1, "max_new_tokens"),
    (["generate", "--prompt-ids", "1,2", "--temperature", "inf"], 1, "temperature"),
    (["generate", "--prompt-ids", "1,2", "--temperature", "nan"], 1, "temperature"),
    (["generate", "--prompt-ids", "1,2", "--top-p", "2"], 1, "top_p"),
    (["generate", "--prompt-ids", "1,2", "--top-k", "-4"], 1, "top_k"),
    (["generate", "--prompt-ids", "1,2", "--seed", "-1"], 1, "seed"),
    (["generate", "--prompt-ids", "1,99999999999"], 1, "token ids"),
    (["generate", "--prompt-ids", "1,2", "--adapter", "nope"], 1, "nope"),
    (["generate", "--prompt-ids", "1,2", "--stop", ""], 1, "stop"),
    (["generate", "--prompt-ids", "a,b"], 2, "prompt-ids"),
    (["generate", "--prompt-ids", "1,2", "--max-new-tokens", "many"], 2, "max-new-tokens"),
    (["adapters", "register", "x", "/elsewhere"], 1, "adapter_config"),
    (["adapters", "unregister", "nobody"], 1, "nobody"),
    (["adapters", "register", "", "/adapters/x"], 1, "name"),
]


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(fake_server, capsys) -> None:
    api, fleet, _ = fake_server
    assert len(GRPC_CASES) + len(CLI_CASES) >= 40
    failures: list[str] = []
    with Client(api.address, timeout=10) as client:
        client.register_adapter("busy-1", "/adapters/v1")
        for name, call, code, fragment in GRPC_CASES:
            try:
                call(client, api.address)
            except ApiError as exc:
                if exc.code != code or fragment not in exc.details:
                    failures.append(f"{name}: {exc.code.name} {exc.details!r}")
            else:
                failures.append(f"{name}: accepted")
            assert "alice" in client.list_adapters(), f"the server stopped serving after {name}"
        for argv, exit_code, fragment in CLI_CASES:
            try:
                got = main([*argv, "--server", api.address])
            except SystemExit as exc:  # argparse usage errors
                got = exc.code
            err = capsys.readouterr().err
            if got != exit_code or fragment not in err or "Traceback" in err:
                failures.append(f"cli {argv}: exit {got}, stderr {err.strip()[-300:]!r}")
            assert "alice" in client.list_adapters(), f"the server stopped serving after cli {argv}"
    assert not fleet.held, "a refused request still holds KV blocks"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--top-k"])
def test_out_of_range_cli_numbers_name_the_parameter(fake_server, capsys, flag) -> None:
    api, _, _ = fake_server
    assert main(["generate", "--prompt-ids", "1", flag, str(2**40), "--server", api.address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorafleet: error:") and flag.strip("-").replace("-", "_") in err
