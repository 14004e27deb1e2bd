"""bench_fleet.py's markdown for the worker kill (lost requests, token comparisons) and the Ray
delivery overhead, and the targets they decide. The policy and migration tables are in
fleet_report.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _decisive(cmp: Mapping[str, Any]) -> str:
    d = cmp.get("decisive")
    if not d:
        return "– (no top-2 logprobs)"
    return f"{d['differ']} of {cmp['compared']} ({d['tokens_compared']:,} tokens compared)"


def kill_table(kill: Mapping[str, Any]) -> str:
    held = kill.get("victim_running")
    who = f"worker pid {kill['pid']}" + (f", holding {held} sequences" if held is not None else "")
    if kill.get("pid") is None:
        who = "nobody: no moment with two active workers and one holding enough sequences"
    head = (
        "| killed | at s | sequences on the fleet | lost requests (target 0) | resumed after fault "
        "| token counts differ |\n|---|---:|---:|---:|---:|---:|\n"
    )
    row = (
        f"| {who} | {_num(kill['at_s'])} | {kill.get('running_at_kill', '–')} | {kill['lost']} "
        f"| {kill['resumed_after_fault']} | {kill.get('length_differs', '–')} |\n"
    )
    return head + row


def comparison_table(kill: Mapping[str, Any], tolerance: float) -> str:
    """Raw and decisive-step differences: the kill run, and the runs without a kill (noise floor)."""
    head = (
        f"| {kill['reference']} against | requests compared | tokens differ (raw) "
        f"| tokens differ before the first near-tie (gap < {tolerance:g} nats) |\n|---|---:|---:|---|\n"
    )
    rows = [kill, *(kill.get("noise_floor") or [])]
    lines = []
    for cmp in rows:
        label = cmp["other"] + (" (the kill run)" if cmp is kill else " (no kill: noise floor)")
        lines.append(f"| {label} | {cmp['compared']} | {cmp['differ']} | {_decisive(cmp)} |")
    return head + "\n".join(lines) + "\n"


def sweep_table(kill: Mapping[str, Any]) -> str:
    """The decisive comparison at each tolerance of the sweep, kill run and noise floor side by side."""
    rows = [kill, *(kill.get("noise_floor") or [])]
    if not kill.get("sweep"):
        return ""
    head = "| near-tie below (nats) | " + " | ".join(f"{c['other']}: differ / tokens compared" for c in rows)
    head += " |\n|---:|" + "---:|" * len(rows) + "\n"
    lines = []
    for k, point in enumerate(kill["sweep"]):
        cells = []
        for cmp in rows:
            s = cmp["sweep"][k] if k < len(cmp.get("sweep") or []) else None
            cells.append(f"{s['differ']} / {s['tokens_compared']:,}" if s else "–")
        lines.append(f"| {point['tolerance']:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def delivery_table(delivery: Mapping[str, Any]) -> str:
    fleet, engine = delivery["fleet"], delivery.get("in_process")
    head = (
        "| path | ITL p50 ms | ITL p99 ms | tokens/s of the path | token produced → caller p50 / p99 ms |\n"
        "|---|---:|---:|---:|---|\n"
    )
    dl = fleet["delivery"]
    rows = [
        f"| through the fleet (Ray, {len(fleet['shards'])} worker(s)) | {_num(fleet['itl']['p50_ms'], 2)} "
        f"| {_num(fleet['itl']['p99_ms'], 2)} | {_num(fleet['tokens_per_s'], 0)} "
        f"| {_num(dl['p50_ms'], 2)} / {_num(dl['p99_ms'], 2)} |"
    ]
    if engine:
        rows.append(
            f"| one engine in-process (the workers' batches in turn) | {_num(engine['itl']['p50_ms'], 2)} "
            f"| {_num(engine['itl']['p99_ms'], 2)} | {_num(engine['tokens_per_s'], 0)} | – |"
        )
    if "added_p50_ms" in delivery:
        rows.append(
            f"| added by the fleet | {delivery['added_p50_ms']:+.2f} | {delivery['added_p99_ms']:+.2f} | | |"
        )
    return head + "\n".join(rows) + "\n"


def pair_intro(pair: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> str:
    """The line above the kill pair's table: what its runs replayed, and how it was sized."""
    planned = next((r.get("plan_requests") for r in runs if r.get("pair")), None)
    of = f" of {planned}" if planned else ""
    cap = f", prompts clamped to {pair['max_prompt_tokens']:,} tokens" if "max_prompt_tokens" in pair else ""
    est = ""
    if "warmup_tokens_per_s" in pair:
        tokens = pair.get("warmup_mean_tokens_per_s") or pair["warmup_tokens_per_s"]
        busy = pair.get("warmup_busy_workers", 1)
        est = (
            f"; sized from the reference's own warm-up: {tokens:,.0f} tokens/s on {busy} busy worker(s), "
            f"taken at {pair['rate_margin']:g}x = {pair['worker_requests_per_s']:.2f} requests/s per "
            f"worker, for ~{pair['reference_s']:.0f} + {pair['kill_s']:.0f} s of replay"
        )
    elif pair:  # fleet.json of the first GPU attempt: sized from a FLOPs guess
        est = (
            f"; sized for ~{pair['reference_s']:.0f} + {pair['kill_s']:.0f} s of replay at "
            f"{pair['worker_requests_per_s']:.2f} requests/s per worker (an estimate)"
        )
    kill_run = pair.get("kill_run")
    shrunk = (
        f"; the kill run replays the first {kill_run['requests']}"
        if kill_run and kill_run["requests"] != pair.get("requests")
        else ""
    )
    held = kill_run or pair
    held_text = (
        f"; the kill waits for a worker holding {held['kill_min_running']}"
        if "kill_min_running" in held
        else ""
    )
    return (
        f"The kill pair ({pair.get('dtype', '?')}, packing; both workers from the start; the plan's first "
        f"{pair.get('requests', '?')}{of} requests at the same times{cap}{est}{shrunk}{held_text}; "
        "GPU-seconds over its own window):"
    )


def kill_targets(kill: Mapping[str, Any] | None) -> list[str]:
    if not kill:
        return []
    if kill.get("pid") is None:
        return ["- killed worker: no worker was killed (see the kill table): **not shown**"]
    d = kill.get("decisive")
    floor = kill.get("noise_floor") or []
    cut = kill.get("cut_off", 0)
    cut_text = f"; {cut} not completed in both runs (the time budget), not judged" if cut else ""
    if kill.get("judge") == "raw":  # float32: every token of every request must be equal
        ok = kill["lost"] == 0 and kill["differ"] == 0 and kill["compared"] > 0
        near = f"; {d['differ']} before their first near-tie (gap < {d['tolerance']:g} nats)" if d else ""
        held = kill.get("victim_running", "?")
        return [
            f"- killed worker ({held} sequences on it), {kill['reference']} against {kill['other']}: "
            f"{kill['lost']} lost{cut_text}, {kill['differ']} of {kill['compared']} requests with any "
            f"token different (raw{near}): **{'met' if ok else 'not met'}**"
        ]
    ok = kill["lost"] == 0 and d is not None and d["differ"] == 0
    if d is None:
        judged = f"{kill['differ']} of {kill['compared']} differ (raw; no top-2 logprobs to judge near-ties)"
    else:
        floor_text = ", ".join(
            f"{f['other']} {f['decisive']['differ']}" for f in floor if f.get("decisive") is not None
        )
        judged = (
            f"{d['differ']} of {kill['compared']} differ before their first near-tie "
            f"(gap < {d['tolerance']:g} nats; raw: {kill['differ']}; without a kill: {floor_text or '–'})"
        )
    held = kill.get("victim_running")
    return [
        f"- killed worker ({held if held is not None else '?'} sequences on it): {kill['lost']} lost"
        f"{cut_text}, {judged}: **{'met' if ok else 'not met'}**"
    ]


def delivery_targets(delivery: Mapping[str, Any] | None) -> list[str]:
    if not delivery or "added_p50_ms" not in delivery:
        return []
    return [
        f"- token delivery through Ray adds under {delivery['target_ms']:g} ms p50 over the in-process "
        f"engine: {delivery['added_p50_ms']:+.2f} ms (ITL p50 {delivery['fleet']['itl']['p50_ms']:.2f} vs "
        f"{delivery['in_process']['itl']['p50_ms']:.2f} ms): **{'met' if delivery['met'] else 'not met'}**"
    ]
