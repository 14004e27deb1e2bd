"""Overlapped stepping (``async_scheduling``) gives exactly what the step-by-step engine gives.

With overlap, ``step()`` queues a forward pass whose inputs may be the previous pass's sampled
tokens, still on the device, and returns the previous pass's deltas. Run on the CPU here, where
nothing overlaps in time but every code path (inputs taken from the device, a one-step lag, tokens
of finished, aborted, exported or preempted sequences dropped) is the same as on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.worker import Engine, FinishReason, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo

ADAPTERS = [None, "adapter-0", "adapter-1", "adapter-2", "adapter-3", "adapter-4", None, "adapter-1"]
# Mixed lengths, so sequences finish at different steps while others keep going.
PARAMS = [
    SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (10, 3, 7, 1, 12, 5, 9, 2)
]
SEEDED = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("overlap") / "demo", num_adapters=5, seed=1)


def make_engine(demo, overlap: bool, **tuning) -> Engine:
    engine = Engine.from_pretrained(demo.model_dir, async_scheduling=overlap, **tuning)
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    return engine


def prompts(n: int = len(ADAPTERS), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 23, 9, 31, 14, 3, 18, 11, 7, 26, 4, 13]
    return [torch.randint(3, 300, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def passes(engine: Engine) -> int:
    runner = engine.runner
    return runner.num_eager_steps + runner.num_graph_steps + runner.num_mixed_graph_steps


@pytest.fixture(scope="module")
def reference(demo):
    engine = make_engine(demo, overlap=False)
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=PARAMS)
    return outs, passes(engine)


@pytest.mark.parametrize(
    "tuning",
    [
        {},
        {"max_num_batched_tokens": 7},  # chunked prefill beside decodes
        {"num_kv_blocks": 12, "block_size": 4},  # preemption, with tokens in flight
        {"max_loras": 2},  # adapter slots recycled while a pass is in flight
        {"max_batch_size": 1},
    ],
    ids=["default", "chunked", "preempt", "two-slots", "batch-1"],
)
def test_overlap_gives_the_same_outputs(demo, reference, tuning) -> None:
    ref, _ = reference
    engine = make_engine(demo, overlap=True, **tuning)
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=PARAMS)
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [
        (o.token_ids, o.text, o.finish_reason) for o in ref
    ]
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks
    assert not engine.has_unfinished()
    if tuning.get("num_kv_blocks"):
        assert stats.num_preemptions > 0


def test_a_sequence_at_its_length_limit_is_not_stepped_again(demo) -> None:
    # One request of 6 tokens: 1 prefill + 5 decode passes either way; overlap must not add a
    # seventh pass for a token it already knows will be dropped.
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    counts = []
    for overlap in (False, True):
        engine = make_engine(demo, overlap=overlap)
        out = engine.generate([prompts(1)[0]], sampling=sp)[0]
        assert len(out.token_ids) == 6
        counts.append(passes(engine))
    assert counts == [6, 6]
    limited = make_engine(demo, overlap=True, max_model_len=20)
    sp = SamplingParams(max_new_tokens=50, ignore_eos=True)
    out = limited.generate([list(range(3, 18))], sampling=sp)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == FinishReason.LENGTH
    assert passes(limited) == 5


def test_seeded_sampling_logprobs_and_stops_match(demo) -> None:
    ps = prompts(4, seed=2)
    ref_engine = make_engine(demo, overlap=False)
    full = ref_engine.generate([ps[1]], adapters=["adapter-3"], sampling=[PARAMS[0]])[0].token_ids
    stop_id = full[4]
    params = [
        SEEDED,
        SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop_id,)),
        SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True),
        SamplingParams(max_new_tokens=11, temperature=1.2, top_k=20, seed=77, ignore_eos=True),
    ]
    adapters = [None, "adapter-3", "adapter-0", "adapter-3"]
    want = ref_engine.generate(ps, adapters=adapters, sampling=params)
    got = make_engine(demo, overlap=True).generate(ps, adapters=adapters, sampling=params)
    assert got[1].token_ids == full[: full.index(stop_id) + 1]
    for w, g in zip(want, got):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)


def _drain(engine: Engine, got: dict[str, list]) -> None:
    while engine.has_unfinished():
        for d in engine.step():
            got.setdefault(d.request_id, []).append(d)


def test_online_lag_abort_and_export_with_a_pass_in_flight(demo, reference) -> None:
    ref, _ = reference
    ps = prompts()
    engine = make_engine(demo, overlap=True)
    for i in range(len(ps)):
        engine.add_request(Request(f"r{i}", tuple(ps[i]), ADAPTERS[i], PARAMS[i]))
    assert engine.step() == []  # the prefill pass is in flight: its tokens come with the next step
    got: dict[str, list] = {}
    for d in engine.step():
        got.setdefault(d.request_id, []).append(d)
    assert set(got) == {f"r{i}" for i in range(len(ps))}
    # r4's and r0's next tokens are in flight now: abort one, export the other.
    final = engine.abort("r4")
    assert final is not None and final.finish_reason == FinishReason.ABORT
    states = engine.export(["r0"])
    assert len(states[0].output_token_ids) == len(got["r0"][0].new_token_ids) == 1
    other = make_engine(demo, overlap=True)
    other.import_(states)
    _drain(engine, got)
    _drain(other, got)
    for i, out in enumerate(ref):
        if i == 4:
            continue
        tokens = tuple(t for d in got[f"r{i}"] for t in d.new_token_ids)
        assert tokens == out.token_ids, f"r{i}"
        assert got[f"r{i}"][-1].finish_reason == out.finish_reason
    assert tuple(t for d in got["r4"] for t in d.new_token_ids) == ref[4].token_ids[:1]
    for e in (engine, other):
        assert e.stats().num_free_kv_blocks == e.stats().num_total_kv_blocks


def test_overlap_switches_are_validated(demo) -> None:
    from lorafleet.worker import EngineConfig

    for name in ("async_scheduling", "lora_side_stream"):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: "yes"})
    assert EngineConfig.from_dict({"async_scheduling": None}).async_scheduling is None
    # YAML's booleans still name the two original modes.
    assert EngineConfig(lora_side_stream=True).lora_side_stream == "full"
    assert EngineConfig(lora_side_stream=False).lora_side_stream == "off"
    assert EngineConfig.from_dict({"lora_side_stream": "shrink"}).lora_side_stream == "shrink"
    # Defaults: on CUDA only; the CPU would gain nothing and deltas would come a step later.
    cpu = make_engine(demo, overlap=None)
    assert not cpu._overlap and cpu.lora_pool.stream is None
    cpu.add_request(Request("x", (5, 6, 7), None, PARAMS[3]))
    (delta,) = cpu.step()  # step by step: the token comes back from the same call
    assert delta.request_id == "x" and len(delta.new_token_ids) == 1
