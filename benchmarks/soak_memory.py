"""The soak's memory side: resident memory of a process tree by role, slopes, and the head's probe.

Roles tell which process grows: the `lorafleet serve` head itself, its worker actors
(`ray::WorkerActor`), Ray's GCS and raylet, and Ray's other processes (agents, idle workers).
A leak keeps its slope to the end of the run; allocator and cache warm-up shows as a slope that
flattens, so each series is fitted over the second half and over the last quarter.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

from proc_tree import cmdline, stat_fields, subtree

ROLES = ("server", "workers", "gcs", "raylet", "ray_other")


def _role(pid: int, root: int, cmdline: str) -> str:
    if pid == root:
        return "server"
    if "WorkerActor" in cmdline:
        return "workers"
    if "gcs_server" in cmdline:
        return "gcs"
    if "/raylet" in cmdline or cmdline.startswith("raylet"):
        return "raylet"
    return "ray_other"


def tree_rss_by_role(root: int) -> dict[str, float]:
    """Resident MB of ``root`` and every process below it (Linux /proc), summed per role."""
    by_role = dict.fromkeys(ROLES, 0.0)
    for pid in subtree(root, stat_fields()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cmd = cmdline(pid)
        if cmd is None:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        by_role[_role(pid, root, cmd)] += int(match.group(1)) / 1024 if match else 0.0
    return by_role


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples in MB per minute; NaN for fewer than 3."""
    if len(samples) < 3:
        return float("nan")
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


def role_report(samples: list[tuple[float, dict[str, float]]], duration_s: float) -> dict[str, dict]:
    """Per role: first and last MB, slope over the second half and over the last quarter."""
    out: dict[str, dict] = {}
    for role in (*ROLES, "total"):
        series = [(t, sum(v.values()) if role == "total" else v[role]) for t, v in samples]
        if not series:
            continue
        out[role] = {
            "first_mb": round(series[0][1], 1),
            "last_mb": round(series[-1][1], 1),
            "slope_2nd_half": round(slope_mb_per_min([s for s in series if s[0] >= duration_s / 2]), 3),
            "slope_last_quarter": round(
                slope_mb_per_min([s for s in series if s[0] >= 0.75 * duration_s]), 3
            ),
        }
    return out


def probe_report(folder: Path, top: int = 12) -> dict:
    """What the head's memory probe saw: bookkeeping sizes and object counts at the middle record
    and the last, and (when it traced) the allocation sites that grew most between them."""
    lines = (folder / "probe.jsonl").read_text().splitlines() if (folder / "probe.jsonl").is_file() else []
    records = [json.loads(line) for line in lines]
    if len(records) < 2:
        return {"records": len(records)}
    mid, last = records[len(records) // 2], records[-1]
    grew_types = {
        name: last["top_types"].get(name, 0) - mid["top_types"].get(name, 0)
        for name in set(mid["top_types"]) | set(last["top_types"])
    }
    report: dict = {
        "records": len(records),
        "from_t_s": mid["t_s"],
        "to_t_s": last["t_s"],
        "rss_mb": [mid["rss_mb"], last["rss_mb"]],
        "objects": [mid["objects"], last["objects"]],
        "sizes_mid": mid["sizes"],
        "sizes_last": last["sizes"],
        "types_grown": dict(sorted(grew_types.items(), key=lambda kv: -abs(kv[1]))[:top]),
    }
    first_snap = folder / f"snapshot-{mid['seq']:04d}.tracemalloc"
    last_snap = folder / f"snapshot-{last['seq']:04d}.tracemalloc"
    if first_snap.is_file() and last_snap.is_file():
        report["traced_mb"] = [mid.get("traced_mb"), last.get("traced_mb")]
        diff = tracemalloc.Snapshot.load(str(last_snap)).compare_to(
            tracemalloc.Snapshot.load(str(first_snap)), "traceback"
        )
        report["grown_sites"] = [
            {
                "kib": round(stat.size_diff / 1024, 1),
                "count": stat.count_diff,
                "where": [f"{f.filename}:{f.lineno}" for f in stat.traceback][-4:],
            }
            for stat in diff[:top]
        ]
    return report
