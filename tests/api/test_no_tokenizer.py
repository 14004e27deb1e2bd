"""A model folder without tokenizer.json serves token-id prompts; a text prompt is INVALID_ARGUMENT
with a message saying why, and the CLI turns it into one `lorafleet: error` line."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from lorafleet.cli import main
from lorafleet.client.grpc_client import ApiError, Client
from lorafleet.serving.api_types import ModelView
from lorafleet.serving.serve import start_api, text_encoder
from lorafleet.worker.demo_assets import make_demo

from .conftest import MAX_CONTEXT, VOCAB, FakeFleet, LoopThread


@pytest.fixture
def tokenizer_less_server(loop_thread: LoopThread, tmp_path: Path):
    model_dir = make_demo(tmp_path / "demo", num_adapters=1).model_dir
    (Path(model_dir) / "tokenizer.json").unlink()
    model = ModelView(name="fake", vocab_size=VOCAB, max_context_tokens=MAX_CONTEXT)
    api = loop_thread.run(start_api(FakeFleet(), model=model, encode=text_encoder(model_dir), port=0))
    yield api
    loop_thread.run(api.stop(grace_s=0.1))


def test_text_prompt_without_tokenizer_is_invalid_argument(tokenizer_less_server, capsys) -> None:
    address = tokenizer_less_server.address
    with Client(address, timeout=10.0) as client:
        out = client.generate([5, 6, 7], sampling={"max_new_tokens": 3})
        assert len(out.token_ids) == 3  # token ids are served
        with pytest.raises(ApiError) as info:
            client.generate("hello", sampling={"max_new_tokens": 3})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "no tokenizer.json" in info.value.details and "token_ids" in info.value.details

    assert main(["generate", "--server", address, "--prompt", "hello", "--timeout", "10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafleet: error"), err
    assert "INVALID_ARGUMENT" in err[0] and "no tokenizer.json" in err[0]
