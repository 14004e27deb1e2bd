"""The sampler (greedy, filters, seeded streams, logprobs) and the stop checker (text, stops)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.worker import sampling
from lorafleet.worker.sampling import PARAM_ROWS, Sampler, chosen_logprobs, seeded_uniform
from lorafleet.worker.sequence import Sequence
from lorafleet.worker.stop_checker import StopChecker
from lorafleet.worker.types import FinishReason, Request, SamplingParams


def test_greedy_and_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.0)]
    tokens, logprobs = Sampler(0).sample(logits, params, [0, 0])
    assert tokens == [1, 0]
    assert logprobs is not None
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))
    assert Sampler(0).sample(logits, [SamplingParams(temperature=0.0)] * 2, [0, 0])[1] is None


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        assert Sampler(1).sample(logits, [p] * 16, list(range(16)))[0] == best


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    sampler = Sampler(3)

    def freq(p: SamplingParams) -> list[float]:
        tokens, _ = sampler.sample(logits.expand(n, 4).clone(), [p] * n, [0] * n)
        return [tokens.count(i) / n for i in range(4)]

    plain = freq(SamplingParams(temperature=1.0))
    assert all(abs(f - q) < 0.03 for f, q in zip(plain, [0.5, 0.3, 0.15, 0.05]))
    top2 = freq(SamplingParams(temperature=1.0, top_k=2))
    assert top2[2] == top2[3] == 0 and abs(top2[0] - 0.625) < 0.03
    nucleus = freq(SamplingParams(temperature=1.0, top_p=0.7))  # keeps 0.5 and 0.3
    assert nucleus[2] == nucleus[3] == 0 and abs(nucleus[0] - 0.625) < 0.03
    hot = freq(SamplingParams(temperature=0.5))  # p^2 renormalised
    assert abs(hot[0] - 0.25 / 0.3775) < 0.03


def test_seeded_draws_depend_only_on_seed_and_index() -> None:
    assert seeded_uniform(7, 3) == seeded_uniform(7, 3)
    draws = {seeded_uniform(7, i) for i in range(100)} | {seeded_uniform(8, 0)}
    assert len(draws) == 101 and all(0 <= u < 1 for u in draws)
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = Sampler(0).sample(logits, [p], [5])[0]
    # Another engine seed and other rows in the batch do not change a seeded draw.
    b = Sampler(99).sample(torch.zeros(3, 1000), [SamplingParams(temperature=1.0), p, p], [0, 5, 6])[0]
    assert b[1] == a[0] and b[2] != a[0]


class CharTokenizer:
    """Token i is chr(i); 0xFF is half of a character (decodes to U+FFFD until 0xFE follows)."""

    def decode(self, ids: list[int]) -> str:
        text = ""
        for t in ids:
            if t == 0xFF:
                text += "\ufffd"
            elif t == 0xFE:
                text = text[:-1] + "é" if text.endswith("\ufffd") else text
            else:
                text += chr(t)
        return text


def _seq(params: SamplingParams, prompt: str = "ab") -> Sequence:
    return Sequence(Request("s", tuple(ord(c) for c in prompt), None, params), 0)


def _feed(checker: StopChecker, seq: Sequence, text: list[int]) -> tuple[list[str], FinishReason | None]:
    deltas, reason = [], None
    for t in text:
        sent = seq.delivered_len
        reason = checker.append_token(seq, t, None)
        deltas.append(seq.text[sent : seq.delivered_len])
        if reason:
            break
    return deltas, reason


def test_stop_string_held_back_across_tokens_and_cut() -> None:
    checker = StopChecker(CharTokenizer(), (1,), max_model_len=100)
    seq = _seq(SamplingParams(max_new_tokens=20, stop=("XYZ",)))
    deltas, reason = _feed(checker, seq, [ord(c) for c in "helloXY"] + [ord("Z"), ord("!")])
    assert reason == FinishReason.STOP
    # "XY" was never delivered before the stop string completed: two characters held back.
    assert "".join(deltas) == "hello" and all("X" not in d for d in deltas)
    assert seq.output_token_ids[-1] == ord("Z")


def test_partial_characters_wait_and_limits() -> None:
    checker = StopChecker(CharTokenizer(), (1,), max_model_len=6)
    seq = _seq(SamplingParams(max_new_tokens=10))
    deltas, reason = _feed(checker, seq, [ord("a"), 0xFF, 0xFE, ord("b"), ord("c")])
    assert deltas == ["a", "", "é", "b"] and reason == FinishReason.LENGTH  # 2 + 4 = context limit
    seq = _seq(SamplingParams(max_new_tokens=2))
    assert _feed(checker, seq, [ord("a"), ord("b"), ord("c")])[1] == FinishReason.LENGTH
    assert len(seq.output_token_ids) == 2
    seq = _seq(SamplingParams(max_new_tokens=5))
    deltas, reason = _feed(checker, seq, [ord("a"), 1, ord("b")])
    assert reason == FinishReason.STOP and deltas == ["a", ""] and seq.output_token_ids == [ord("a"), 1]


def test_restore_rebuilds_text_and_held_back_tail() -> None:
    checker = StopChecker(CharTokenizer(), (), max_model_len=100)
    params = SamplingParams(max_new_tokens=20, stop=("XYZ",))
    seq = _seq(params)
    _feed(checker, seq, [ord(c) for c in "hiXY"])
    state = seq.to_state()
    assert state.output_text == "hi"
    fresh = Sequence(state.request, 1)
    checker.restore(fresh, state)
    assert fresh.text == "hiXY" and fresh.delivered_len == 2
    deltas, reason = _feed(checker, fresh, [ord("Z")])
    assert reason == FinishReason.STOP and fresh.text == "hi" and deltas == [""]


# --- the packed sampler against the list-based one it replaced ---


class ListSampler:
    """The sampler as of commit c65e0b5 (per-row lists, several host copies), verbatim: the oracle."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, logits, params, draw_indices):
        n = logits.shape[0]
        if n == 0:
            return [], None
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            picked = self._sample_rows(
                logits.index_select(0, index), [params[i] for i in rows], [draw_indices[i] for i in rows]
            )
            tokens.index_copy_(0, index, picked)
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        return tokens.tolist(), (logprobs.tolist() if logprobs is not None else None)

    def _sample_rows(self, logits, params, draw_indices):
        device = logits.device
        vocab = logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        vals, order = torch.sort(logits / temps.unsqueeze(1), dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        vals = vals.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        probs = torch.softmax(vals, dim=-1)
        outside = (torch.cumsum(probs, dim=-1) - probs) > top_p.unsqueeze(1)
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
        cdf = torch.cumsum(probs, dim=-1)
        draws = [
            seeded_uniform(p.seed, i) if p.seed is not None else None for p, i in zip(params, draw_indices)
        ]
        unseeded = sum(d is None for d in draws)
        shared = torch.rand(unseeded, generator=self._generator, dtype=torch.float64).tolist()
        uniforms = [d if d is not None else shared.pop(0) for d in draws]
        u = torch.tensor(uniforms, dtype=torch.float32, device=device).unsqueeze(1) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
        choice = torch.minimum(choice, (probs > 0).sum(dim=-1, keepdim=True) - 1)
        return order.gather(1, choice).squeeze(1)


def random_batch(g: torch.Generator, n: int, vocab: int):
    """Mixed rows: greedy / sampled, seeded / not, filters on and off, logprobs on some; logits
    rounded to a coarse grid so many values tie, with some -inf entries."""
    logits = (torch.randn(n, vocab, generator=g) * 4).round() / 2
    logits[torch.rand(n, vocab, generator=g) < 0.1] = float("-inf")
    params = []
    for _ in range(n):
        r = torch.randint(0, 1000, (6,), generator=g).tolist()
        params.append(
            SamplingParams(
                temperature=[0.0, 0.7, 1.0, 1.3][r[0] % 4],
                top_k=[0, 1, 3, vocab, vocab + 5][r[1] % 5],
                top_p=[1.0, 0.9, 0.5, 1e-3][r[2] % 4],
                seed=r[3] if r[3] % 2 else None,
                logprobs=r[4] % 3 == 0,
            )
        )
    draws = torch.randint(0, 50, (n,), generator=g).tolist()
    return logits, params, draws


def test_matches_the_list_based_sampler_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(11)
    new, old = Sampler(5), ListSampler(5)
    for step in range(30):  # the shared generator's stream must stay in step across calls
        logits, params, draws = random_batch(g, 1 + step % 9, 23)
        if step % 4 == 0:
            params = [SamplingParams(temperature=0.0)] * len(params)  # the argmax-only fast path
        got, want = new.sample(logits, params, draws), old.sample(logits, params, draws)
        assert got[0] == want[0] and all(type(t) is int for t in got[0])
        assert got[1] == want[1]  # floats equal exactly (None == None when nobody asked)


def test_one_read_back_and_no_sort_for_greedy(monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    logits, params, draws = random_batch(g, 7, 31)
    params[0] = SamplingParams(temperature=1.0, logprobs=True)
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    Sampler(0).sample(logits, params, draws)
    assert calls == [(2, 7)]  # tokens and logprobs leave together, in one tolist
    calls.clear()

    def no_sort(*args, **kwargs):
        raise AssertionError("an all-greedy step sorted the vocabulary")

    monkeypatch.setattr(torch, "sort", no_sort)
    sampler = Sampler(0)
    tokens, logprobs = sampler.sample(logits, [SamplingParams(temperature=0.0)] * 7, draws)
    assert calls == [(7,)] and logprobs is None and tokens == logits.argmax(-1).tolist()
    # No uniform was drawn: the engine generator is where a fresh one starts.
    assert torch.equal(
        torch.rand(3, generator=sampler._generator), torch.rand(3, generator=torch.Generator().manual_seed(0))
    )


def test_pack_and_sample_tensors() -> None:
    g = torch.Generator().manual_seed(4)
    logits, params, draws = random_batch(g, 8, 19)
    params[1] = SamplingParams(temperature=0.5, top_k=10**20, seed=3)  # huge top_k: no filter
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    packed = Sampler(9).pack(params, draws, "cpu")
    assert packed is not None and packed.dtype == torch.float64
    assert tuple(packed.shape) == (PARAM_ROWS, len(sampled))
    assert packed[sampling.ROW_INDEX].tolist() == sampled
    j = sampled.index(1)
    assert packed[sampling.UNIFORM, j] == seeded_uniform(3, draws[1])
    assert packed[sampling.TOP_K, j] == 2**31
    tokens = Sampler.sample_tensors(logits, packed)
    assert tokens.dtype == torch.int64 and tokens.tolist() == Sampler(9).sample(logits, params, draws)[0]
    lp = chosen_logprobs(logits, tokens)
    assert torch.equal(lp, torch.log_softmax(logits, -1)[torch.arange(8), tokens])
    # A huge top_k draws exactly what no top_k draws.
    p0 = SamplingParams(temperature=0.5, seed=3)
    assert Sampler(0).sample(logits[1:2], [p0], [draws[1]])[0] == [tokens[1].item()]
    assert Sampler(0).pack([SamplingParams(temperature=0.0)], [0], "cpu") is None


@pytest.mark.parametrize(
    "packed,match",
    [
        (torch.zeros(5, 2, dtype=torch.float32), "packed: expected float64"),
        (torch.zeros(4, 2, dtype=torch.float64), "packed: expected float64"),
        (torch.zeros(5, 4, dtype=torch.float64), "packed: expected float64"),
    ],
)
def test_sample_tensors_checks_its_inputs(packed, match) -> None:
    with pytest.raises(ValueError, match=match):
        Sampler.sample_tensors(torch.zeros(3, 10), packed)
    with pytest.raises(ValueError, match="logits: expected float32"):
        Sampler.sample_tensors(torch.zeros(3, 10, dtype=torch.float64), None)


@pytest.mark.gpu
def test_cuda_matches_cpu_with_one_copy_each_way() -> None:
    """Same tokens on CUDA as on the CPU (draws are host-side), logprobs to float32 round-off, and
    the profiler sees one host-to-device and one device-to-host copy per step."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(7)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = torch.log(probs).repeat(64, 1) + torch.randn(64, 6, generator=g) * 1e-3
    params = [
        SamplingParams(
            temperature=[0.0, 1.0, 0.8][i % 3], top_k=i % 4, seed=i if i % 2 else None, logprobs=i == 5
        )
        for i in range(64)
    ]
    draws = list(range(64))
    cpu_tokens, cpu_lp = Sampler(1).sample(logits, params, draws)
    dev_logits = logits.cuda()
    sampler = Sampler(1)
    sampler.sample(dev_logits, params, draws)  # warm up (allocator, kernels)
    sampler = Sampler(1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tokens, lp = sampler.sample(dev_logits, params, draws)
    assert tokens == cpu_tokens
    assert lp is not None and cpu_lp is not None
    assert max(abs(a - b) for a, b in zip(lp, cpu_lp)) < 1e-5
    names = [e.name for e in prof.events()]
    assert sum("HtoD" in n for n in names) == 1, names
    assert sum("DtoH" in n for n in names) == 1, names


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -0.5])
def test_temperature_must_be_finite_and_non_negative(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=temperature)
