"""`DemoConfig`: every tunable of `lorafleet demo`, frozen and validated; one CLI flag per field.

The workload's rates are not here: the demo measures what one worker sustains on this machine and
sizes them from that (`quiet_load`, `burst_load`), so the same settings tell the same story on a
fast machine and on a slow one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.bench.workload import POPULARITIES
from lorafleet.scheduler.fleet_config import POLICIES


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None


@dataclass(frozen=True)
class DemoConfig:
    cache_dir: Path | None = None  # where the demo model lives (None: ~/.cache/lorafleet/demo)
    out_dir: Path = Path("lorafleet-demo")  # where the run's JSON and PNG go
    workers: int = 3
    max_batch_size: int = 4  # per worker: small, so a burst needs more than one worker
    calibration_s: float = 4.0  # how long one worker is measured before the workload
    quiet_s: float = 5.0  # first quiet phase
    burst_s: float = 6.0
    cooldown_s: float = 10.0  # the quiet phase after the burst: migrations, then release to one
    quiet_load: float = 0.3  # quiet rate, as a share of what one worker sustains (low TTFT)
    burst_load: float = 2.0  # burst rate, as a multiple of what one worker sustains
    consolidation_interval_s: float = 0.25
    idle_release_s: float = 1.0  # after the burst, a worker idle this long is released
    prompt_len: tuple[int, int] = (8, 48)
    output_len: tuple[int, int] = (48, 192)
    popularity: str = "skewed"
    policy: str = "packing"
    seed: int = 0
    slice_s: float = 1.0  # the timeline's resolution
    json: bool = False  # print the run's summary as one JSON object, the last line of stdout
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 2:
            raise ValueError(
                "--workers must be an integer >= 2 (the story is one worker growing to more), "
                f"got {self.workers!r}"
            )
        if (
            isinstance(self.max_batch_size, bool)
            or not isinstance(self.max_batch_size, int)
            or self.max_batch_size < 1
        ):
            raise ValueError(f"--max-batch-size must be an integer >= 1, got {self.max_batch_size!r}")
        for name in (
            "calibration_s",
            "quiet_s",
            "burst_s",
            "cooldown_s",
            "consolidation_interval_s",
            "slice_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{_flag(name)} must be a number > 0, got {value!r}")
        if not 0 <= self.idle_release_s < math.inf:
            raise ValueError(f"--idle-release-s must be a number >= 0, got {self.idle_release_s!r}")
        if not 0 < self.quiet_load < 1:
            raise ValueError(
                f"--quiet-load must be between 0 and 1 (a share of one worker), got {self.quiet_load!r}"
            )
        if not 1 < self.burst_load < math.inf:
            raise ValueError(
                f"--burst-load must be > 1 (a burst one worker cannot carry), got {self.burst_load!r}"
            )
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"--{_flag(name)} must satisfy 1 <= LOW <= HIGH, got {lo}-{hi}")
        if self.popularity not in POPULARITIES:
            raise ValueError(
                f"--popularity must be one of {', '.join(POPULARITIES)}, got {self.popularity!r}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")

    @property
    def workload_s(self) -> float:
        return self.quiet_s + self.burst_s + self.cooldown_s

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _flag(name: str) -> str:
    return name.replace("_", "-")


_HELP: dict[str, str] = {
    "cache_dir": "where the demo model lives (default ~/.cache/lorafleet/demo)",
    "out_dir": "where the run's demo-run.json and demo-run.png go",
    "workers": "CPU workers",
    "max_batch_size": "sequences per worker batch",
    "calibration_s": "seconds spent measuring what one worker sustains",
    "quiet_s": "length of the first quiet phase (s)",
    "burst_s": "length of the burst (s)",
    "cooldown_s": "length of the quiet phase after the burst (s)",
    "quiet_load": "quiet request rate as a share of one worker's measured capacity",
    "burst_load": "burst request rate as a multiple of one worker's measured capacity",
    "consolidation_interval_s": "seconds between consolidation passes (migrations, releases)",
    "idle_release_s": "after the burst, release a worker idle this long (s)",
    "prompt_len": "prompt tokens: N or LOW-HIGH",
    "output_len": "generated tokens: N or LOW-HIGH",
    "popularity": "adapter mix",
    "policy": "placement policy",
    "seed": "workload seed",
    "slice_s": "timeline resolution (s)",
    "json": "print the run's summary as one JSON object, the last line of stdout",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig field (dest = field name), defaults taken from the dataclass."""
    for f in dataclasses.fields(DemoConfig):
        default: Any = f.default
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif f.name in ("prompt_len", "output_len"):
            kwargs["type"] = _range
        elif f.name in ("cache_dir", "out_dir"):
            kwargs["type"] = Path
        elif f.name == "popularity":
            kwargs["choices"] = POPULARITIES
        elif f.name == "policy":
            kwargs["choices"] = POLICIES
        else:
            kwargs["type"] = type(default)
        shown = "-".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = "" if isinstance(default, bool) or default is None else f" (default {shown})"
        p.add_argument(f"--{_flag(f.name)}", help=_HELP[f.name] + suffix, **kwargs)
