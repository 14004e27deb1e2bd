"""Plots of the equal-attainment study (benchmarks/sim_equal_slo.py): each family's GPU-seconds
against SLO attainment over its sweep, and GPUs over time and latency CDFs of the chosen runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorafleet.sim.plots import pyplot, save_cdfs


def plot_tradeoff(families: list[str], runs: list[dict], levels: list[float], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for family in families:
        mine = sorted((r for r in runs if r["family"] == family), key=lambda r: r["slo_attainment"])
        xs = [100 * r["slo_attainment"] for r in mine]
        ys = [r["gpu_seconds"] for r in mine]
        ax.plot(xs, ys, marker="o", label=family)
        for r, x, y in zip(mine, xs, ys):
            knob = (
                f"T{r['pack_batch_target']}" if r["pack_batch_target"] is not None else f"max{r['max_gpus']}"
            )
            ax.annotate(knob, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for level in levels:
        ax.axvline(100 * level, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("SLO attainment (%)")
    ax.set_ylabel("GPU-seconds")
    ax.set_title("GPU-seconds against SLO attainment, each policy over its knob")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gpus(chosen: list[dict], runs_dir: Path, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in chosen:
        gpus = np.load(runs_dir / f"{r['key']}.npz")["gpus"]
        end = r["duration_s"]
        t = np.append(gpus[:, 0], end)
        n = np.append(gpus[:, 1], gpus[-1, 1])
        ax.step(t, n, where="post", label=f"{r['key']} ({r['gpu_seconds']:,.0f} GPU-s)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GPUs in use")
    ax.set_title("GPUs in use, each policy at its equal-attainment setting")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(chosen: list[dict], runs_dir: Path, path: Path) -> None:
    series = []
    for r in chosen:
        data = np.load(runs_dir / f"{r['key']}.npz")
        series.append((r["key"], [data["ttft"], data["tpot"]]))
    save_cdfs(series, ("TTFT", "TPOT"), path, figsize=(11, 4), legend_fontsize=7)


def write_study_plots(families: list[str], runs: list[dict], picks: list[dict], out: Path) -> None:
    levels = sorted({p["level"] for p in picks})
    plot_tradeoff(families, runs, levels, out / "tradeoff.png")
    # GPUs over time and CDFs at the first level asked for: each family's cheapest run reaching it.
    first = [p["cheapest"] for p in picks if p["level"] == picks[0]["level"] and p["cheapest"]]
    if first:
        plot_gpus(first, out / "runs", out / "gpus.png")
        plot_cdfs(first, out / "runs", out / "latency_cdf.png")
