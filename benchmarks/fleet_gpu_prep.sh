#!/usr/bin/env bash
# Before `gpu_suite.sh OUT fleet` on the GPU machine: run on your machine, in the checkout, after
# ../shared/gpu/ray-wheels.sh (which recreates .gpuwheels). Adds to .gpuwheels/b, which the fleet
# call carries (well under the 64 MiB limit with Ray's second half):
# - traces/: the Azure conv trace, and the first day of each ServeGen m-large tenant (the window
#   bench_fleet.py reads its tenant shares from; 1 MB instead of 13). Copies outside the repository.
# - extra/: wheels of the serve process's HTTP stack (fastapi, uvicorn, httpx and their dependencies),
#   installed there only if the image lacks them.
# and copies ray-wheels.sh's grpcio wheels into .gpuwheels/a too: the first call's fleet-assets stage
# runs `lorafleet make-demo`, whose command line imports the gRPC client.
#   FLEET_TRACES_SRC=DIR to read the traces elsewhere than ../shared/traces.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
src=${FLEET_TRACES_SRC:-$top/../shared/traces}
[ -f "$src/azure_llm_2023_conv.csv" ] && [ -d "$src/servegen_m_large" ] || {
    echo "fleet_gpu_prep: no traces in $src (set FLEET_TRACES_SRC)" >&2
    exit 1
}
dst=.gpuwheels/b/traces
rm -rf "$dst" .gpuwheels/b/extra
mkdir -p "$dst/servegen_m_large" .gpuwheels/b/extra
cp "$src/azure_llm_2023_conv.csv" "$dst/"
for f in "$src"/servegen_m_large/chunk-*-trace.csv; do
    head -n 144 "$f" >"$dst/servegen_m_large/$(basename "$f")"  # 144 windows of 600 s = one day
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpuwheels/b/extra fastapi uvicorn httpx
cp .gpuwheels/b/grpcio*.whl .gpuwheels/a/ 2>/dev/null || echo "no grpcio wheels in .gpuwheels/b: run ray-wheels.sh first" >&2
du -sh .gpuwheels/* .gpuwheels/b/traces .gpuwheels/b/extra
