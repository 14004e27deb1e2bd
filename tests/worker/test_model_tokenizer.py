"""Tokenizer wrapper: round trips and streaming deltas over split UTF-8 characters."""

from __future__ import annotations

import pytest

from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.tokenizer import Tokenizer

TEXTS = [
    "Hello world, the quick brown fox.",
    "Héllo wörld — naïve café 你好世界 🙂🚀 done",
    "def add(a, b):\n    return a + b\n",
    "🙂",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(make_demo(tmp_path_factory.mktemp("demo"), num_adapters=0).model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text


def test_special_tokens(tok):
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.token_to_id("</s>") == 1
    assert tok.decode([*tok.encode("hi"), 1]) == "hi"  # special tokens skipped by default
    assert "</s>" in tok.decode([*tok.encode("hi"), 1], skip_special_tokens=False)
    assert tok.vocab_size == 384
    with pytest.raises(ValueError, match="expected a str"):
        tok.encode(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_stream_deltas_concatenate_to_text(tok, text, step):
    ids = tok.encode(text)
    out, emitted_partial = [], False
    for i in range(0, len(ids), step):
        delta = tok.decode_delta(ids[:i], ids[i : i + step])
        emitted_partial |= "\ufffd" in delta
        out.append(delta)
    assert "".join(out) == text and not emitted_partial


def test_partial_utf8_is_held_back_then_completed(tok):
    ids = tok.encode("🙂")
    assert len(ids) >= 2  # the emoji's 4 bytes span several byte-level tokens
    assert tok.decode(ids[:1]).endswith("\ufffd")
    assert tok.decode_delta([], ids[:1]) == ""
    assert tok.decode_delta(ids[:1], ids[1:]) == "🙂"


def test_final_flushes_incomplete_bytes(tok):
    ids = tok.encode("a🙂")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    assert tok.decode_delta([], ids[:cut]) == "a"
    assert tok.decode_delta(ids[: cut - 1], ids[cut - 1 : cut], final=True).endswith("\ufffd")


def test_long_history_uses_a_window(tok):
    ids = tok.encode("word " * 200 + "end")
    prev, new = ids[:-1], ids[-1:]
    assert tok.decode_delta(prev, new) == tok.decode(ids)[len(tok.decode(prev)) :]


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    model_dir = make_demo(tmp_path / "m", num_adapters=0).model_dir
    (model_dir / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_dir(model_dir)
