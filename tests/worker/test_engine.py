"""Engine behaviour on the demo model: scheduling variants leave outputs unchanged, the online API,
stop conditions and request validation. (Parity with transformers is in test_engine_parity.py.)"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from lorafleet.worker import Engine, EngineConfig, FinishReason, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo

ADAPTERS = [None, "adapter-0", "adapter-1", "adapter-2", "adapter-3", "adapter-4", None, "adapter-1"]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("engine") / "demo", num_adapters=5, seed=1)


def make_engine(demo, **tuning) -> Engine:
    engine = Engine.from_pretrained(demo.model_dir, **tuning)
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    return engine


def prompts(n: int = len(ADAPTERS), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 23, 9, 31, 14, 3, 18, 11, 7, 26, 4, 13]
    return [torch.randint(3, 300, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def reference(demo) -> list[tuple[int, ...]]:
    outs = make_engine(demo).generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert len({o.token_ids for o in outs}) == len(outs)  # distinct outputs: a mix-up would show
    return [o.token_ids for o in outs]


def test_chunked_prefill_keeps_outputs(demo, reference) -> None:
    engine = make_engine(demo, max_num_batched_tokens=7)
    for i, (p, a) in enumerate(zip(prompts(), ADAPTERS)):
        engine.add_request(Request(f"r{i}", tuple(p), a, GREEDY))
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
    # 7 tokens a step cannot prefill 123 prompt tokens quickly: the prompts were chunked.
    assert steps >= sum(len(p) for p in prompts()) // 7
    assert [tuple(tokens[f"r{i}"]) for i in range(len(ADAPTERS))] == reference


def test_preemption_under_tiny_kv_budget_keeps_outputs(demo, reference) -> None:
    engine = make_engine(demo, num_kv_blocks=12, block_size=4)
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks == 12


def test_adapter_eviction_with_two_slots_keeps_outputs(demo, reference) -> None:
    engine = make_engine(demo, max_loras=2)
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference
    stats = engine.stats()
    assert len(stats.resident_adapters) <= 2
    assert stats.adapter_cache_misses >= 5  # five adapters through two slots
    assert len(stats.adapter_load_seconds) == stats.adapter_cache_misses
    assert all(s >= 0 for s in stats.adapter_load_seconds)


def test_batch_size_one_keeps_outputs(demo, reference) -> None:
    outs = make_engine(demo, max_batch_size=1).generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference


def _run(engine: Engine, until_tokens: int | None = None) -> dict[str, list]:
    """Step until done (or until every request has ``until_tokens`` tokens); collect deltas."""
    got: dict[str, list] = {}
    while engine.has_unfinished():
        if until_tokens is not None and got and min(len(v) for v in got.values()) >= until_tokens:
            break
        for d in engine.step():
            got.setdefault(d.request_id, []).append(d)
    return got


def test_export_import_mid_generation_continues_exactly(demo) -> None:
    params = [
        GREEDY,
        SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7, logprobs=True),
        SamplingParams(max_new_tokens=12, temperature=1.3, seed=123, ignore_eos=True),
    ]
    ps, ads = prompts(3, seed=4), ["adapter-2", "adapter-0", None]
    ref = make_engine(demo).generate(ps, adapters=ads, sampling=params)

    src, dst = make_engine(demo), make_engine(demo, seed=99)
    for i in range(3):
        src.add_request(Request(f"m{i}", tuple(ps[i]), ads[i], params[i]))
    first = _run(src, until_tokens=2)
    states = src.export(["m0", "m1", "m2"])
    assert not src.has_unfinished()
    assert src.stats().num_free_kv_blocks == src.stats().num_total_kv_blocks
    assert [len(s.output_token_ids) for s in states] == [len(first[f"m{i}"]) for i in range(3)]
    dst.import_(states)
    second = _run(dst)
    for i in range(3):
        deltas = first[f"m{i}"] + second[f"m{i}"]
        tokens = tuple(t for d in deltas for t in d.new_token_ids)
        assert tokens == ref[i].token_ids, f"request {i}"
        assert "".join(d.new_text for d in deltas) == ref[i].text
        assert deltas[-1].finish_reason == ref[i].finish_reason
    logprobs = [lp for d in first["m1"] + second["m1"] for lp in d.new_logprobs]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref[1].logprobs), atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_batch_independent(demo) -> None:
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    engine = make_engine(demo)
    alone = engine.generate([prompts(1)[0]], sampling=p)[0].token_ids
    crowd = engine.generate(prompts(6), adapters=[None, "adapter-1"] * 3, sampling=[p] + [GREEDY] * 5)
    assert crowd[0].token_ids == alone
    other_seed = engine.generate([prompts(1)[0]], sampling=SamplingParams(**{**p.__dict__, "seed": 43}))
    assert other_seed[0].token_ids != alone


def test_stop_token_eos_and_ignore_eos(demo, reference) -> None:
    engine = make_engine(demo)
    target = reference[1]
    stop_id = target[4]
    first = target.index(stop_id)
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop_id,))
    out = engine.generate([prompts()[1]], adapters=[ADAPTERS[1]], sampling=sp)[0]
    assert out.token_ids == target[: first + 1] and out.finish_reason == FinishReason.STOP
    # The same id as EOS: stops unless ignore_eos.
    engine.stop_checker.eos_token_ids = frozenset({stop_id})
    sp = SamplingParams(max_new_tokens=10, temperature=0.0)
    assert (
        engine.generate([prompts()[1]], adapters=[ADAPTERS[1]], sampling=sp)[0].token_ids
        == target[: first + 1]
    )
    out = engine.generate([prompts()[1]], adapters=[ADAPTERS[1]], sampling=GREEDY)[0]
    assert out.token_ids == target and out.finish_reason == FinishReason.LENGTH


def test_stop_string_truncates_text(demo) -> None:
    engine = make_engine(demo)
    text_prompt = "The quick brown fox"
    full = engine.generate(
        [text_prompt], sampling=SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    )
    text = full[0].text
    candidates = [text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].isascii()]
    if not candidates:
        pytest.skip("the random model produced no ASCII text to stop on")
    stop = candidates[0]
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
    out = engine.generate([text_prompt], sampling=sp)[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text


def test_context_limit_and_logprobs(demo) -> None:
    engine = make_engine(demo, max_model_len=20)
    sp = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True, logprobs=True)
    out = engine.generate([list(range(3, 18))], sampling=sp)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == FinishReason.LENGTH
    assert len(out.logprobs) == 5 and all(lp <= 0 for lp in out.logprobs)


def test_online_api_streams_and_aborts(demo) -> None:
    engine = make_engine(demo)
    ps = prompts(3)
    for i in range(3):
        engine.add_request(Request(f"o{i}", tuple(ps[i]), ADAPTERS[i], GREEDY))
    deltas = engine.step()
    assert {d.request_id for d in deltas} == {"o0", "o1", "o2"}
    assert all(len(d.new_token_ids) == 1 and d.num_prompt_tokens == len(ps[i]) for i, d in enumerate(deltas))
    stats = engine.stats()
    assert stats.num_running == 3 and set(stats.running_request_ids) == {"o0", "o1", "o2"}
    final = engine.abort("o1")
    assert final is not None and final.finish_reason == FinishReason.ABORT
    assert engine.abort("o1") is None
    rest = _run(engine)
    assert set(rest) == {"o0", "o2"}
    assert engine.stats().num_free_kv_blocks == engine.stats().num_total_kv_blocks


def test_bad_requests_raise_clear_errors(demo) -> None:
    engine = make_engine(demo, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="empty"):
        Request("x", ())
    with pytest.raises(ValueError, match="context limit"):
        engine.add_request(Request("long", tuple([5] * 64)))
    with pytest.raises(KeyError, match="nope"):
        engine.add_request(Request("u", (5, 6), adapter="nope"))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(Request("v", (5, 10**6)))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="2 prompts"):
        engine.generate([[5], [6]], adapters=[None])
    engine.add_request(Request("dup", (5, 6)))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(Request("dup", (5, 6)))
    with pytest.raises(KeyError, match="unknown or finished"):
        engine.export(["missing"])
    with pytest.raises(ValueError, match="unknown engine option"):
        Engine.from_pretrained(demo.model_dir, max_batchsize=3)
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="KV blocks"):
        make_engine(demo, num_kv_blocks=2, block_size=4).add_request(
            Request("big", tuple([5] * 8), sampling=SamplingParams(max_new_tokens=8))
        )


def test_adapter_removal_and_failed_load(demo, tmp_path: Path) -> None:
    engine = make_engine(demo)
    engine.add_request(Request("a", (5, 6, 7), "adapter-0", GREEDY))
    with pytest.raises(ValueError, match="used by unfinished"):
        engine.remove_adapter("adapter-0")
    _run(engine)
    engine.remove_adapter("adapter-0")
    assert "adapter-0" not in engine.list_adapters()
    with pytest.raises(KeyError):
        engine.add_request(Request("b", (5, 6), "adapter-0"))
    # An adapter whose files vanish after registration fails its request, not the engine.
    shutil.copytree(demo.adapters["adapter-1"], tmp_path / "gone")
    engine.add_adapter("gone", tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    engine.add_request(Request("c", (5, 6), "gone", GREEDY))
    engine.add_request(Request("d", (5, 6), None, GREEDY))
    got = _run(engine)
    assert got["c"][-1].finish_reason == FinishReason.ERROR and "gone" in got["c"][-1].error
    assert got["d"][-1].finish_reason == FinishReason.LENGTH


def test_bad_export_and_import_lose_nothing(demo) -> None:
    engine = make_engine(demo)
    engine.add_request(Request("e", (5, 6, 7), None, GREEDY))
    engine.step()
    with pytest.raises(ValueError, match="appears twice"):
        engine.export(["e", "e"])
    assert engine.has_unfinished()  # the failed export took nothing out
    (state,) = engine.export(["e"])
    other = make_engine(demo)
    with pytest.raises(ValueError, match="expects SequenceState"):
        other.import_([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="logprobs"):
        other.import_([dataclasses.replace(state, output_logprobs=(0.0, 0.0))])
    assert not other.has_unfinished()
    other.import_([state])
    assert _run(other)["e"][-1].finish_reason == FinishReason.LENGTH


def test_generate_leaves_the_engine_idle_when_a_step_raises(demo, monkeypatch) -> None:
    engine = make_engine(demo)

    def broken(*args, **kwargs):
        raise RuntimeError("detokenizer broke")

    monkeypatch.setattr(engine.stop_checker, "append_tokens", broken)
    with pytest.raises(RuntimeError, match="detokenizer broke"):
        engine.generate(prompts(3), adapters=ADAPTERS[:3], sampling=GREEDY)
    stats = engine.stats()
    assert not engine.has_unfinished() and stats.num_free_kv_blocks == stats.num_total_kv_blocks
    monkeypatch.undo()
    assert len(engine.generate(prompts(1), sampling=GREEDY)[0].token_ids) == GREEDY.max_new_tokens


def test_model_without_tokenizer_takes_token_ids_and_refuses_text(demo, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(demo.model_dir, folder, ignore=shutil.ignore_patterns("adapters"))
    (folder / "tokenizer.json").unlink()
    engine = Engine.from_pretrained(folder)
    assert engine.tokenizer is None
    with_tokenizer = Engine.from_pretrained(demo.model_dir)
    ids = prompts(1)
    expected = with_tokenizer.generate(ids, sampling=GREEDY)[0].token_ids
    assert engine.generate(ids, sampling=GREEDY)[0].token_ids == expected  # same model, same tokens
    with pytest.raises(ValueError, match=r"prompt 0 is text.*without a tokenizer.*token-id lists"):
        engine.generate(["hello"], sampling=GREEDY)
    stop = dataclasses.replace(GREEDY, stop=("x",))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate(ids, sampling=stop)
    # skip_tokenizer_init ignores a tokenizer.json that is there (even a broken one).
    (folder / "tokenizer.json").write_text("{}")
    assert Engine.from_pretrained(folder, skip_tokenizer_init=True).tokenizer is None


def test_bookkeeping_returns_to_idle_after_finishes_aborts_and_exports(demo) -> None:
    engine = make_engine(demo, max_batch_size=4)
    idle = engine.bookkeeping_sizes()
    assert (idle["seqs"], idle["waiting"], idle["running"], idle["kv_blocks_used"]) == (0, 0, 0, 0)
    for i, (p, a) in enumerate(zip(prompts(), ADAPTERS)):
        engine.add_request(Request(f"b{i}", tuple(p), a, GREEDY))
    engine.step()
    busy = engine.bookkeeping_sizes()
    assert busy["seqs"] == len(ADAPTERS) and busy["kv_blocks_used"] > 0 and busy["pins"] > 0
    engine.abort("b0")
    engine.export(["b1"])
    while engine.has_unfinished():
        engine.step()
    done = engine.bookkeeping_sizes()
    assert (done["seqs"], done["waiting"], done["running"], done["kv_blocks_used"]) == (0, 0, 0, 0)
    assert (done["pins"], done["loading"], done["failed"], done["pending_uploads"]) == (0, 0, 0, 0)
    assert done["adapters_registered"] == len(demo.adapters)  # one entry per name, however many loads


def test_cpu_threads_sets_torch_threads_for_the_engine_and_threads_it_starts_later(demo) -> None:
    import threading

    before = torch.get_num_threads()
    target = 2 if before == 1 else 1  # differs from the process's setting whatever the machine
    try:
        engine = make_engine(demo, cpu_threads=target)
        later: list[int] = []
        # A worker actor steps its engine on a thread it starts after building the engine.
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == target and later == [target]
        assert engine.generate([[5, 6, 7]], sampling=GREEDY)[0].token_ids
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cpu_threads"):
            EngineConfig(cpu_threads=bad)
