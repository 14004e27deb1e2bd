#!/usr/bin/env bash
# One call on a GPU machine: install lorafleet offline, run the GPU tests, then the benchmarks named.
#   benchmarks/gpu_suite.sh OUT_DIR STAGE...     stages: tests, attention, adapters, engine-quick,
#                                                engine-e2e, engine-7b, engine-8b, sgmv, profile-7b
# Each stage logs to OUT_DIR/<stage>.log; a failing stage does not stop the next one.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR STAGE...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1
if ! (cd /tmp && python3 -c "import lorafleet.worker") 2>>"$out/install.log"; then
    # Fall back to the package-dir mapping of pyproject.toml as a tree of links on PYTHONPATH.
    tree=/tmp/lorafleet-path/lorafleet
    rm -rf /tmp/lorafleet-path && mkdir -p "$tree"
    ln -s "$PWD"/app/* "$tree"/
    for sub in kernels worker scheduler proto sim; do ln -s "$PWD/$sub" "$tree/$sub"; done
    export PYTHONPATH=/tmp/lorafleet-path${PYTHONPATH:+:$PYTHONPATH}
    (cd /tmp && python3 -c "import lorafleet.worker") || { cat "$out/install.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for stage in "$@"; do
    start=$(date +%s)
    case $stage in
    tests)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/worker ;;
    tests-new)  # what the decode-loop work touched (the SGMV kernels' own GPU tests are unchanged)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/worker tests/kernels/test_paged_attention_gpu.py \
            tests/kernels/test_fused_ops_gpu.py ;;
    attention)
        python3 benchmarks/bench_attention.py --out "$out" ;;
    adapters)
        python3 benchmarks/bench_adapter_load.py --out "$out" ;;
    engine-quick)
        python3 benchmarks/bench_engine.py --out "$out/quick" --shapes llama2-7b --batches 16,64 \
            --contexts 256,1024 --popularities backbone,identical,distinct --no-e2e --peft-new-tokens 0 \
            --compare-sync --compare-lora-stream ;;
    engine-e2e)  # end to end and transformers + PEFT only (7B shape)
        python3 benchmarks/bench_engine.py --out "$out/e2e" --shapes llama2-7b --batches 64 --contexts 256 \
            --popularities distinct --no-reference ;;
    engine-7b)
        python3 benchmarks/bench_engine.py --out "$out/7b" --shapes llama2-7b ;;
    engine-8b)
        python3 benchmarks/bench_engine.py --out "$out/8b" --shapes llama3-8b --peft-new-tokens 0 ;;
    sgmv)
        python3 benchmarks/bench_sgmv.py --out "$out/sgmv" ;;
    profile-7b)  # the simulator's H200 profile of the 7B shape (make-demo --shape, then profile)
        lf() { python3 -c 'import sys; from lorafleet.cli import main; sys.exit(main())' "$@"; }
        lf make-demo --shape llama2-7b --num-adapters 8 --overwrite /tmp/lf-7b &&
            lf profile --model /tmp/lf-7b --device cuda --no-ray-start --no-serving --engine max_batch_size=64 \
                --engine max_loras=16 --name h200-llama2-7b --out "$out/h200-llama2-7b.yaml" ;;
    *)
        echo "unknown stage $stage" ;;
    esac >"$out/$stage.log" 2>&1
    rc=$?
    echo "== $stage: rc $rc, $(($(date +%s) - start)) s"
    tail -n 40 "$out/$stage.log"
done
