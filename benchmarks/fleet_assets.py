"""Model and adapters for bench_fleet.py: `lorafleet make-demo`, then adapters under many names.

Writing 100 distinct random r16 adapters of the 7B shape would cost 16 GB of float32 files and a
minute of random draws, for nothing the scheduler can tell apart. So `make-demo` writes a few
distinct ones and the rest are more folders whose weights file is a hard link to one of them (a
copy where links are not possible): each is its own registered adapter to the fleet, loaded and
cached under its own name, as tenants' adapters are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    adapters_dir: Path
    num_adapters: int
    distinct_adapters: int
    seconds: float  # spent making them (0 when reused)
    reused: bool


def _marker(shape: str | None, distinct: int) -> dict[str, object]:
    return {"shape": shape or "tiny-demo", "distinct_adapters": distinct}


def make_assets(
    work_dir: Path,
    *,
    shape: str | None,
    num_adapters: int,
    distinct: int,
    log_path: Path,
    device: str = "cpu",
) -> Assets:
    """The model in work_dir/model and num_adapters adapters in work_dir/model/adapters.

    Reused when a previous call made the same shape with the same distinct adapters (a warm machine
    keeps /tmp between calls); the adapter names are then completed to num_adapters.
    """
    if num_adapters < 1 or not 1 <= distinct <= num_adapters:
        raise ValueError(f"need 1 <= distinct ({distinct}) <= adapters ({num_adapters})")
    model = work_dir / "model"
    adapters = model / "adapters"
    marker = work_dir / "assets.json"
    start = time.monotonic()
    reused = marker.is_file() and json.loads(marker.read_text()) == _marker(shape, distinct)
    if not reused:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "lorafleet.cli", "make-demo", str(model)]
        cmd += ["--num-adapters", str(distinct)]
        if shape is not None:
            cmd += ["--shape", shape, "--device", device]
        with log_path.open("a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"make-demo failed (exit {done.returncode}); see {log_path}")
        marker.write_text(json.dumps(_marker(shape, distinct)))
    link_adapters(adapters, num_adapters, distinct)
    seconds = 0.0 if reused else time.monotonic() - start
    return Assets(model, adapters, num_adapters, distinct, seconds, reused)


def link_adapters(adapters_dir: Path, total: int, distinct: int) -> None:
    """Folders adapter-<distinct>..adapter-<total-1>, each sharing the weights of adapter-(i % distinct)."""
    for i in range(distinct):
        if not (adapters_dir / f"adapter-{i}" / WEIGHTS).is_file():
            raise FileNotFoundError(f"{adapters_dir}/adapter-{i}/{WEIGHTS} is missing (make-demo output?)")
    for i in range(distinct, total):
        source = adapters_dir / f"adapter-{i % distinct}"
        target = adapters_dir / f"adapter-{i}"
        if (target / WEIGHTS).is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / CONFIG, target / CONFIG)
        try:
            os.link(source / WEIGHTS, target / WEIGHTS)
        except OSError:  # a file system without hard links
            shutil.copyfile(source / WEIGHTS, target / WEIGHTS)
