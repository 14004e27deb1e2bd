"""Decode under CUDA graphs gives what eager mode gives, while batch sizes, adapters and slots change;
and so do graphs captured while the engine is idle, and steps whose bucket has no graph yet."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorafleet.worker import Engine, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo

pytestmark = pytest.mark.gpu


def run(
    model_dir: Path,
    adapters: dict[str, Path],
    dtype: str,
    eager: bool,
    overlap: bool = True,
    side_stream: str = "off",
    graph_capture: str = "start",
    between_waves: Callable[[Engine], None] | None = None,
    max_prompt: int = 39,
):
    engine = Engine.from_pretrained(
        model_dir,
        device="cuda",
        dtype=dtype,
        max_batch_size=24,
        max_loras=4,  # 8 adapters over 4 slots: admission waves, evictions, new slots per wave
        max_lora_rank=16,
        enforce_eager=eager,
        async_scheduling=overlap,
        lora_side_stream=side_stream,
        graph_capture=graph_capture,
    )
    names = sorted(adapters)
    for name in names:
        engine.add_adapter(name, adapters[name])
    logits: dict[str, list[torch.Tensor]] = {}
    inner = engine.runner.run

    def spy(plan):
        out = inner(plan)
        for rid, row in zip(plan.sample_seq_ids, out):
            logits.setdefault(rid, []).append(row.float().cpu())
        return out

    engine.runner.run = spy  # type: ignore[method-assign]
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    outputs = []
    for wave in range(2):
        if wave and between_waves is not None:
            between_waves(engine)
        prompts = [
            [rng.randrange(3, vocab) for _ in range(rng.randrange(1, max_prompt + 1))] for _ in range(30)
        ]
        chosen = [rng.choice([None, *names]) for _ in prompts]
        # Different lengths: sequences finish at different steps, so the batch shrinks through buckets.
        params = [
            SamplingParams(max_new_tokens=rng.randrange(2, 24), temperature=0.0, ignore_eos=True)
            for _ in prompts
        ]
        outputs += engine.generate(prompts, adapters=chosen, sampling=params)
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_total_kv_blocks
    return engine, outputs, logits


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_graph_replay_matches_eager_mode(tmp_path: Path, dtype: str, tol: float) -> None:
    demo = make_demo(tmp_path, num_adapters=8, seed=3)
    eager_engine, eager_out, eager_logits = run(demo.model_dir, demo.adapters, dtype, True)
    graph_engine, graph_out, graph_logits = run(demo.model_dir, demo.adapters, dtype, False)
    assert eager_engine.runner.num_graph_steps == eager_engine.runner.num_mixed_graph_steps == 0
    assert graph_engine.runner.num_graph_steps > 20  # most decode steps replayed a graph
    # Steps with prompt rows replayed their row bucket's graph (all of them fit 2,048 rows).
    assert graph_engine.runner.num_mixed_graph_steps >= 2
    assert graph_engine.runner.num_eager_steps == 0
    assert_same_generation(eager_out, eager_logits, graph_out, graph_logits, tol)


def assert_same_generation(want_out, want_logits, got_out, got_logits, tol: float) -> None:
    """Each request's logits agree within ``tol`` for as long as its tokens agree (each step's logits
    depend only on the tokens before it), and tokens part only at a step whose top two logits were
    within the tolerance of each other."""
    for e, g in zip(want_out, got_out):
        want = torch.stack(want_logits[e.request_id])
        got = torch.stack(got_logits[g.request_id])
        n = min(len(e.token_ids), len(g.token_ids))
        split = next((i for i in range(n) if e.token_ids[i] != g.token_ids[i]), n)
        if split == n:
            assert got.shape == want.shape
        upto = min(split + 1, len(want), len(got))
        scale = float(want.abs().max())
        torch.testing.assert_close(got[:upto], want[:upto], rtol=tol, atol=tol * scale)
        if split < n:
            top2 = want[split].topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * tol * scale, f"{e.request_id}: tokens part at step {split}"


def test_overlapped_stepping_matches_step_by_step(tmp_path: Path) -> None:
    """Inputs taken from the previous step's tokens on the device, under graphs and in eager mixed
    steps, give the logits and tokens of stepping one pass at a time."""
    demo = make_demo(tmp_path, num_adapters=8, seed=3)
    # Freed blocks and slots reach the next admission one step later with overlap, so batches may
    # be composed differently (other GEMM shapes): compare within float32 tolerance.
    _, sync_out, sync_logits = run(demo.model_dir, demo.adapters, "float32", False, overlap=False)
    engine, over_out, over_logits = run(demo.model_dir, demo.adapters, "float32", False, overlap=True)
    assert engine._overlap and engine.runner.num_graph_steps > 20
    assert_same_generation(sync_out, sync_logits, over_out, over_logits, 1e-3)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 5e-2)])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("mode", ["full", "shrink"])
def test_lora_on_a_side_stream_matches(
    tmp_path: Path, dtype: str, tol: float, eager: bool, mode: str
) -> None:
    demo = make_demo(tmp_path, num_adapters=8, seed=3)
    _, want_out, want_logits = run(demo.model_dir, demo.adapters, dtype, eager)
    engine, got_out, got_logits = run(demo.model_dir, demo.adapters, dtype, eager, side_stream=mode)
    assert engine.lora_pool.stream is not None and engine.lora_pool.side_mode == mode
    assert_same_generation(want_out, want_logits, got_out, got_logits, tol)


def test_padding_rows_leave_the_cache_alone(tmp_path: Path) -> None:
    """Batches of 3 replay the 4-row graph, and their prompts (6 rows) the 32-row graph; a padding
    row (token 0 at position 0) that wrote a KV slot would overwrite some sequence's first token, so
    the cache would differ from eager mode's."""
    demo = make_demo(tmp_path, num_adapters=0, seed=1)
    caches = []
    for eager in (True, False):
        engine = Engine.from_pretrained(
            demo.model_dir, device="cuda", dtype="float32", max_batch_size=4, enforce_eager=eager
        )
        sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        engine.generate([[5, 6, 7], [8, 9], [10]], sampling=sp)
        assert (engine.runner.num_graph_steps > 0) != eager
        assert (engine.runner.num_mixed_graph_steps > 0) != eager
        caches.append(torch.cat([t.flatten() for t in engine.kv.k + engine.kv.v]))
    assert caches[0].abs().sum() > 0
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-4, atol=1e-4)


def capture_all_idle(engine: Engine) -> None:
    """Drive the idle captures to the end, as a serving worker does between requests."""
    runner = engine.runner
    left = len(runner.schedule.pending())
    assert left > 0
    while engine.run_idle_work():
        left -= 1
    assert left == 0 and runner.idle_capture_error is None and not runner.schedule.failed
    assert {t.key for t in runner.capture_timings if t.at == "idle"} == set(runner.schedule.captured()) - set(
        runner.schedule.startup()
    )


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_idle_captures_match_eager_mode(tmp_path: Path, dtype: str, tol: float) -> None:
    """Wave 1 runs before the large prefill buckets have graphs (those steps run eagerly), then every
    idle graph is captured (after sequences, slots and the KV cache were used), and wave 2 replays
    them: both waves give eager mode's logits and tokens."""
    demo = make_demo(tmp_path, num_adapters=8, seed=3)
    # Prompts of up to 200 tokens: a step that admits three of them already passes 256 rows.
    _, eager_out, eager_logits = run(demo.model_dir, demo.adapters, dtype, True, max_prompt=200)
    counts: dict[str, int] = {}

    def between(engine: Engine) -> None:
        counts["uncaptured"] = engine.runner.num_uncaptured_steps
        capture_all_idle(engine)
        counts["mixed"] = engine.runner.num_mixed_graph_steps

    engine, out, logits = run(
        demo.model_dir,
        demo.adapters,
        dtype,
        False,
        graph_capture="idle",
        between_waves=between,
        max_prompt=200,
    )
    runner = engine.runner
    # Wave 1 prefilled past 256 rows in a step, without a graph yet.
    assert counts["uncaptured"] >= 1
    # Wave 2 ran every step as a graph, the large prefill steps included.
    assert runner.num_uncaptured_steps == runner.num_eager_steps == counts["uncaptured"]
    assert runner.num_mixed_graph_steps > counts["mixed"]
    assert_same_generation(eager_out, eager_logits, out, logits, tol)


def drive(engine: Engine, requests: list[Request], tokens: dict[str, list[int]]) -> None:
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)


def test_a_step_without_its_graph_runs_eagerly_and_matches(tmp_path: Path) -> None:
    """An idle-mode engine that never had an idle moment: a 300-row prefill (bucket 384, not
    captured) runs eagerly beside graph-replayed steps, with start mode's tokens and logits."""
    demo = make_demo(tmp_path, num_adapters=1, seed=5)
    (name,) = demo.adapters
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 384) for _ in range(100)] for _ in range(3)]
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    results = []
    for mode in ("start", "idle"):
        engine = Engine.from_pretrained(
            demo.model_dir, device="cuda", dtype="float32", max_batch_size=4, graph_capture=mode
        )
        engine.add_adapter(name, demo.adapters[name])
        seen: list[torch.Tensor] = []
        inner = engine.runner.run

        def spy(plan, inner=inner, seen=seen):
            out = inner(plan)
            seen.append(out.float().cpu())
            return out

        engine.runner.run = spy  # type: ignore[method-assign]
        tokens: dict[str, list[int]] = {}
        # Through add_request, not generate() (which would capture an idle graph first). The adapter
        # is loaded by a first request, so the three prompts are admitted together: one 300-row
        # step with LoRA rows beside base ones.
        drive(engine, [Request("warm", (7, 8, 9, 10), name, sp)], tokens)
        drive(
            engine,
            [Request(f"r{i}", tuple(p), name if i else None, sp) for i, p in enumerate(prompts)],
            tokens,
        )
        results.append((engine.runner, tokens, seen))
    (start_runner, start_tokens, start_logits), (idle_runner, idle_tokens, idle_logits) = results
    assert start_runner.num_eager_steps == 0 and start_runner.num_mixed_graph_steps >= 2
    assert idle_runner.num_uncaptured_steps == idle_runner.num_eager_steps == 1
    assert idle_runner.num_graph_steps == start_runner.num_graph_steps > 0
    assert idle_tokens == start_tokens
    assert len(idle_logits) == len(start_logits)
    for got, want in zip(idle_logits, start_logits):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
