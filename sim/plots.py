"""PNG plots of simulation runs: GPUs in use with the request rate, and latency CDFs.

matplotlib is imported here only, with the Agg backend, so the simulator itself never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorafleet.sim.report import latencies
from lorafleet.sim.sim_types import SimResult


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: the simulator never needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gpus(results: Sequence[SimResult], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    end = max(r.end_s for r in results)
    for r in results:
        if not r.gpus_over_time:
            continue
        t = [p[0] for p in r.gpus_over_time] + [end]
        n = [p[1] for p in r.gpus_over_time] + [r.gpus_over_time[-1][1]]
        ax.step(t, n, where="post", label=f"{r.config.label} ({r.gpu_seconds:.0f} GPU-s)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GPUs in use")
    arrivals = np.fromiter((rec.arrival for rec in results[0].records), float)
    if len(arrivals):
        width = max(end / 100, 1e-3)
        bins = np.arange(0, end + width, width)
        counts, edges = np.histogram(arrivals, bins=bins)
        rate_ax = ax.twinx()
        rate_ax.plot(edges[:-1], counts / width, color="grey", alpha=0.5, linewidth=1, label="request rate")
        rate_ax.set_ylabel("requests / s", color="grey")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("GPUs in use and the request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_cdfs(
    series: Sequence[tuple[str, Sequence[np.ndarray]]],
    names: Sequence[str],
    path: Path,
    *,
    figsize: tuple[float, float],
    legend_fontsize: float,
) -> None:
    """One panel per quantity in ``names`` (seconds, log scale), each series' empirical CDF in it:
    ``series`` is (label, one array of values per panel)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=figsize)
    for label, per_panel in series:
        for ax, values in zip(axes, per_panel):
            if len(values):
                xs = np.sort(values)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    for ax, name in zip(axes, names):
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdfs(results: Sequence[SimResult], path: Path) -> None:
    series = [(r.config.label, latencies(r)) for r in results]
    save_cdfs(series, ("TTFT", "TPOT", "end-to-end latency"), path, figsize=(13, 4), legend_fontsize=8)


def write_plots(results: Sequence[SimResult], out_dir: Path) -> list[Path]:
    paths = [out_dir / "gpus.png", out_dir / "latency_cdf.png"]
    plot_gpus(results, paths[0])
    plot_latency_cdfs(results, paths[1])
    return paths
