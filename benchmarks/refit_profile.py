"""Re-fit a saved latency profile's terms whose fitting rule changed, from the raw samples it holds.

    .venv/bin/python benchmarks/refit_profile.py docs/sim/validation-h200-host/profile.yaml OUT.yaml

What is re-fitted: the per-adapter slope, now rescaled to the decode sweep's speed
(`lorafleet.sim.profile_fit.adapter_slope`). Everything else (the base table, the serving-stack terms,
which come from measurements the file keeps only as fitted values) is kept as it is. The output
says in its `source` that it was re-fitted, and from which file.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from lorafleet.sim.profile import load_profile, parse_profile
from lorafleet.sim.profile_fit import adapter_slope, adapter_sweep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="a profile YAML written by `lorafleet profile`, with its samples")
    p.add_argument("out", type=Path, help="the re-fitted profile YAML to write")
    args = p.parse_args()
    profile = load_profile(args.profile)
    top = profile.engine.max_batch_size
    if top not in profile.decode_batch:
        raise SystemExit(f"{args.profile}: its base table has no step at the batch limit {top}")
    reference = profile.decode_base_s[profile.decode_batch.index(top)]
    sweep = adapter_sweep(profile.samples)
    per_adapter = adapter_slope(sweep, profile.per_context_token_s, reference)
    refit = dataclasses.replace(
        profile,
        per_adapter_s=per_adapter,
        source=f"{profile.source}; per_adapter_s re-fitted from its samples by benchmarks/refit_profile.py "
        f"(was {profile.per_adapter_s:.6g} s) from {args.profile}",
    )
    mapping = refit.to_mapping()
    parse_profile(mapping, str(args.out))  # what we write must load back
    header = "# Latency profile for lorafleet sim, re-fitted by benchmarks/refit_profile.py.\n"
    args.out.write_text(header + yaml.safe_dump(mapping, sort_keys=False, width=110, default_flow_style=None))
    print(
        f"wrote {args.out}: per_adapter_s {profile.per_adapter_s * 1e3:.3f} -> {per_adapter * 1e3:.3f} ms "
        f"(decode sweep's step at batch {top}: {reference * 1e3:.3f} ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
