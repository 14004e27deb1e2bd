"""The demo run as a picture: workers busy and up, the queue, and the migrations, phase by phase."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.bench.runner import WorkerSample
    from lorafleet.demo.story import Phase

PHASE_COLOURS = {"quiet": "#e8f4e8", "burst": "#fde8d8", "cooldown": "#e8eef8"}


def write_plot(
    path: Path, samples: Sequence[WorkerSample], phases: Sequence[Phase], *, workers: int, title: str
) -> Path:
    """Write a PNG of the run to `path` (parent folders made) and return it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is touched
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("no worker samples to plot")
    t = [s.t_s for s in samples]
    end = max(t[-1], phases[-1].end_s)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 4.8), sharex=True, gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True
    )
    for ax in (top, bottom):
        for i, p in enumerate(phases):
            hi = end if i == len(phases) - 1 else p.end_s
            ax.axvspan(p.start_s, hi, color=PHASE_COLOURS.get(p.name, "#f0f0f0"), zorder=0)
    for p in phases:
        top.text(
            (p.start_s + p.end_s) / 2,
            workers + 0.35,
            f"{p.name}\n{p.rate_rps:.1f} req/s",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    top.step(t, [s.active for s in samples], where="post", color="#999999", ls="--", label="workers up")
    top.step(t, [s.busy for s in samples], where="post", color="#c0392b", lw=2, label="workers busy")
    moves = [
        (b.t_s, b.migrations - a.migrations)
        for a, b in itertools.pairwise(samples)
        if b.migrations > a.migrations
    ]
    if moves:
        top.scatter(
            [m[0] for m in moves],
            [0.25] * len(moves),
            marker="v",
            s=[25 + 10 * m[1] for m in moves],
            color="#2c3e50",
            zorder=3,
            label=f"migrations ({sum(m[1] for m in moves)})",
        )
    top.set_ylim(0, workers + 1.2)
    top.set_yticks(range(workers + 1))
    top.set_ylabel("workers")
    top.legend(loc="upper right", fontsize=8, framealpha=0.9)
    top.set_title(title, fontsize=10)
    bottom.fill_between(t, [s.queue_len for s in samples], step="post", color="#2980b9", alpha=0.6)
    bottom.set_ylabel("queue")
    bottom.set_xlabel("seconds since the workload began")
    bottom.set_xlim(0, end)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
