"""top_logprobs: the sampler's alternatives per token, and the engine carrying them through steps,
export/import and the offline API."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafleet.worker import Engine, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.sampling import Sampler


def test_sampler_returns_each_rows_top_alternatives() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g)
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.0, logprobs=True),  # logprobs, but no alternatives
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=1, logprobs=True, top_logprobs=1),
    ]
    launched = Sampler(0).launch(logits, params, [0, 0, 0, 0])
    tokens, logprobs = launched.result()
    tops = launched.top_logprobs()
    assert tops is not None and tops[1] is None and tops[2] is None
    full = torch.log_softmax(logits, dim=-1)
    values, ids = full.topk(3, dim=-1)
    assert [t for t, _ in tops[0]] == ids[0].tolist()
    assert [lp for _, lp in tops[0]] == pytest.approx(values[0].tolist(), abs=1e-6)
    assert tops[0][0][0] == tokens[0] and tops[0][0][1] == pytest.approx(logprobs[0], abs=1e-6)
    assert len(tops[3]) == 1 and tops[3][0][0] == ids[3, 0].item()  # the best, whatever was drawn
    # A step where nobody asked has no alternatives at all.
    plain = Sampler(0).launch(logits, [SamplingParams(temperature=0.0, logprobs=True)] * 4, [0] * 4)
    plain.result()
    assert plain.top_logprobs() is None


def test_top_logprobs_are_validated() -> None:
    with pytest.raises(ValueError, match="needs logprobs"):
        SamplingParams(top_logprobs=2)
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 20\]"):
            SamplingParams(logprobs=True, top_logprobs=bad)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("top") / "demo", num_adapters=2, seed=2)


def _engine(demo) -> Engine:
    engine = Engine.from_pretrained(demo.model_dir)
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    return engine


def test_engine_streams_alternatives_and_carries_them_across_export(demo) -> None:
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    prompt = (5, 17, 40, 9, 33)
    ref = _engine(demo).generate([list(prompt)], adapters=["adapter-1"], sampling=sp)[0]
    assert ref.top_logprobs is not None and len(ref.top_logprobs) == len(ref.token_ids) == 8
    for token, lp, top in zip(ref.token_ids, ref.logprobs, ref.top_logprobs):
        (best, best_lp), (second, second_lp) = top
        assert best == token and best_lp == pytest.approx(lp, abs=1e-5)
        assert second != best and second_lp <= best_lp

    src, dst = _engine(demo), _engine(demo)
    src.add_request(Request("m", prompt, "adapter-1", sp))
    got = []
    while len([t for d in got for t in d.new_token_ids]) < 3:
        got += src.step()
    (state,) = src.export(["m"])
    assert len(state.output_top_logprobs) == len(state.output_token_ids)
    with pytest.raises(ValueError, match="output top logprobs for"):
        dst.import_([dataclasses.replace(state, output_top_logprobs=state.output_top_logprobs[:-1])])
    dst.import_([state])
    while dst.has_unfinished():
        got += dst.step()
    tops = [top for d in got for top in d.new_top_logprobs]
    assert [t for d in got for t in d.new_token_ids] == list(ref.token_ids)
    assert [[t for t, _ in top] for top in tops] == [[t for t, _ in top] for top in ref.top_logprobs]
    # Without top_logprobs nothing is carried.
    plain = _engine(demo).generate([list(prompt)], sampling=dataclasses.replace(sp, top_logprobs=0))[0]
    assert plain.top_logprobs is None and plain.logprobs is not None


@pytest.mark.gpu
def test_cuda_alternatives_match_cpu_in_the_one_copy_back() -> None:
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(32, 32000, generator=g) * 1.3
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=(2 if i % 3 else 0)) for i in range(32)
    ]
    draws = [0] * 32
    cpu = Sampler(0).launch(logits, params, draws)
    cpu_tokens, _ = cpu.result()
    dev_logits = logits.cuda()
    Sampler(0).launch(dev_logits, params, draws).result()  # warm up (allocator, kernels)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dev = Sampler(0).launch(dev_logits, params, draws)
        tokens, _ = dev.result()
    assert tokens == cpu_tokens
    for a, b in zip(dev.top_logprobs(), cpu.top_logprobs()):
        assert (a is None) == (b is None)
        if a is not None:
            assert [t for t, _ in a] == [t for t, _ in b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    names = [e.name for e in prof.events()]
    assert sum("DtoH" in n for n in names) == 1, names
