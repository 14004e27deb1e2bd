#!/usr/bin/env bash
# One call on a GPU machine: install lorafleet offline, run the GPU tests, then the benchmarks named.
#   benchmarks/gpu_suite.sh OUT_DIR STAGE...     stages: tests, tests-new, tests-sgmv, graph-tests, attention,
#                                                adapters, engine-quick, engine-rows, engine-e2e, engine-7b, engine-8b,
#                                                sgmv, sgmv-quick, sgmv-side, sgmv-ab, sgmv-sweep, decode-floor, pdl-probe, profile-engine, profile-7b,
#                                                startup-7b, fleet-assets, fleet, fleet-f32, sim-validate
# Each stage logs to OUT_DIR/<stage>.log; a failing stage does not stop the next one.
#
# fleet (two GPUs, issue 12; FLEET_BUDGET_S seconds, default 520, plus ~12 s of setup) needs Ray,
# which the GPU image lacks. On your machine, in the checkout: `bash ../shared/gpu/ray-wheels.sh &&
# bash benchmarks/fleet_gpu_prep.sh`; then two calls on the same nvidia-h200-x2 machine, back to back:
#   1) carry .gpuwheels/a:  cp .gpuwheels/a/part_aa /tmp/ray_part_aa && bash benchmarks/gpu_suite.sh $OUT fleet-assets
#   2) carry .gpuwheels/b:  FLEET_BUDGET_S=515 bash benchmarks/gpu_suite.sh $OUT fleet
# It runs the three policies, the worker kill, one migration and the Ray delivery overhead (inter-token
# latency through the fleet against the engine in-process); FLEET_RATES=QUIET,BURST and
# FLEET_PHASES=Q,B,Q (seconds) override the profile's 4,22 requests/s and 3,27,27 s
# (benchmarks/fleet_sim_check.py checks a choice in the simulator first); FLEET_ARGS adds flags.
# fleet-f32 is fleet with `--kill-dtype float32 --skip migration,delivery`: the bf16 policy runs,
# then the kill as a float32 pair (packing-f32, packing-f32-kill: the plan's first requests, prompts
# clamped to 256 tokens, as many as the reference's own warm-up speed fits; raw token equality)
# instead of the bf16 kill run, and no migration or delivery measurement, into OUT/fleet-f32/
# (fleet.json, fleet.md, fleet.png, logs.txt). Two float32 server starts (85 and 57 s on the first
# try) do not fit after three bf16 runs: with the policy comparison already measured, call 2 is
#   2) carry .gpuwheels/b:  FLEET_BUDGET_S=540 FLEET_ARGS="--policies packing" bash benchmarks/gpu_suite.sh $OUT fleet-f32
# fleet-assets makes the 7B model and adapters (about a minute) so that the fleet call spends its
# budget on the runs; fleet alone makes them too when they are missing. fleet assembles Ray as
# ../shared/gpu/README.md says, adds the serve extras only if the image lacks them, and reads the
# traces fleet_gpu_prep.sh put in .gpuwheels/b/traces.
#
# sim-validate (issue 11; CPUs only, about 3 minutes on 16 cores): the simulator against a real CPU
# fleet of demo-model workers on a machine with a core per worker (the 2-core development machine
# cannot give them one). Needs Ray as fleet does: carry .gpuwheels/b, on a machine where Ray is in
# /tmp/site from an earlier call or /tmp/ray_part_aa is there (else first: carry .gpuwheels/a,
# `cp .gpuwheels/a/part_aa /tmp/ray_part_aa`). It measures a CPU profile of the demo model there
# (`lorafleet profile`, through the serving stack, each worker's torch threads fixed by
# `--engine cpu_threads`), then runs benchmarks/validate_sim.py with the same threads. Results:
# OUT/sim-validate/{machine.txt, profile.yaml, report.md, result.json, real.json}. The workload
# shrinks for a dry run: SIMVAL_RATE (quiet req/s, burst 10x; 3), SIMVAL_PHASE_S (30),
# SIMVAL_WORKERS (3), SIMVAL_THREADS (torch threads per worker; 2), SIMVAL_REPEATS (profile; 20).
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

use_site() {  # /tmp/site (wheels installed by an earlier stage or call) first on PYTHONPATH
    [ -d /tmp/site ] || return 0
    case ":${PYTHONPATH:-}:" in
    *:/tmp/site:*) ;;
    *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;;
    esac
}

site_wheels() {  # the wheels in folder $1 into /tmp/site
    if ls "$1"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$1"/*.whl
    fi
    use_site
}

fleet_setup() {  # Ray (+ a current grpcio) into /tmp/site; a later call on the machine finds it there
    use_site
    if ! python3 -c "import ray" 2>/dev/null; then
        [ -f /tmp/ray_part_aa ] && [ -f .gpuwheels/b/NAME ] || {
            echo "no Ray: run the first call (cp .gpuwheels/a/part_aa /tmp/ray_part_aa) on this machine first"
            return 1
        }
        cat /tmp/ray_part_aa .gpuwheels/b/part_ab >"/tmp/$(cat .gpuwheels/b/NAME)"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$(cat .gpuwheels/b/NAME)"
        site_wheels .gpuwheels/b
    fi
    if ! python3 -c "import fastapi, uvicorn, httpx" 2>/dev/null && [ -d .gpuwheels/b/extra ]; then
        python3 -m pip install -q --no-index --no-compile --target /tmp/site --find-links .gpuwheels/b/extra \
            fastapi uvicorn httpx
    fi
    python3 -c "import ray, grpc_health, fastapi, uvicorn, httpx, yaml; print('ray', ray.__version__)"
}

SGMV_DECODE_CASES=o4096:16:1:distinct,o4096:16:16:distinct,o4096:16:32:distinct,o4096:16:64:distinct,\
o4096:16:16:identical-padded,o4096:16:64:identical-padded,o4096:16:64:uniform-padded,\
o4096:16:16:distinct-padded,o4096:16:64:distinct-padded,qkv:16:64:distinct-padded,qkv:16:64:identical-padded,\
o4096:16:256:distinct,o4096:64:64:distinct
SGMV_ROW_VARIANTS=rows_off,rows_avg4,rows_rank32,rows_elems_4k,rows_elems_16k,rows_min_programs_528,\
rows_min_programs_132,rows_warps_8

fleet_bench() {  # bench_fleet.py on two GPUs into $out/$1, with the flags after it
    local traces=${FLEET_TRACES:-.gpuwheels/b/traces} dir=$1
    shift
    [ -d "$traces" ] || traces=../shared/traces
    python3 benchmarks/bench_fleet.py --out "$out/$dir" \
        --time-budget-s "${FLEET_BUDGET_S:-520}" --trace "$traces/azure_llm_2023_conv.csv" \
        --servegen "$traces/servegen_m_large" ${FLEET_RATES:+--rates "$FLEET_RATES"} \
        ${FLEET_PHASES:+--phases-s "$FLEET_PHASES"} "$@"
}

for stage in "$@"; do
    start=$(date +%s)
    case $stage in
    tests)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/worker ;;
    tests-new)  # what the decode-loop work touched (the SGMV kernels' own GPU tests are unchanged)
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/worker tests/kernels/test_paged_attention_gpu.py \
            tests/kernels/test_fused_ops_gpu.py ;;
    graph-tests)  # CUDA graphs against eager mode, idle captures and steps whose graph is not captured yet
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/worker/test_cuda_graphs_gpu.py ;;
    startup-7b)  # engine start-up by phase, graph_capture start vs idle, the idle captures (~1-2 min)
        python3 benchmarks/bench_startup.py --out "$out/startup" ;;
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
    sgmv-quick)  # the anchored cases only (issue 2's table), with the torch baselines
        python3 benchmarks/bench_sgmv.py --out "$out/sgmv-quick" --quick ;;
    sgmv-side)  # the anchored cases again with the L2 emptied by a 512 MiB read (the side-by-side's flush)
        python3 benchmarks/bench_sgmv.py --out "$out/sgmv-side" --quick --flush read --flush-mib 512 ;;
    sgmv-ab)  # bench_sgmv --quick as A (the tree), B (SGMV_AB_PATCH applied), A, B; sgmv_ab.py compares
        ab=/tmp/sgmv-ab patch=${SGMV_AB_PATCH:?sgmv-ab needs SGMV_AB_PATCH=a patch file (patch -p1)}
        rm -rf "$ab" && for i in 1 2; do
            python3 benchmarks/bench_sgmv.py --out "$ab/a$i" --quick --baseline-reps 5 >"$ab-a$i.log" 2>&1
            patch -p1 -s <"$patch" || break
            python3 benchmarks/bench_sgmv.py --out "$ab/b$i" --quick --baseline-reps 5 >"$ab-b$i.log" 2>&1
            patch -R -p1 -s <"$patch" || break
        done
        python3 benchmarks/sgmv_ab.py "$ab" --md "$out/sgmv-ab.md" ;;
    tests-sgmv)  # the SGMV kernels' GPU tests (tile and row-wise paths, graphs, PDL); SGMV_TESTS_K selects
        python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_sgmv_gpu.py ${SGMV_TESTS_K:+-k "$SGMV_TESTS_K"} ;;
    sgmv-sweep)  # decode-shaped cases under the row-wise and long-segment launch variants
        python3 benchmarks/bench_sgmv.py --out "$out/sgmv-sweep" --sweep-only --reps 200 \
            --sweep-cases "${SGMV_SWEEP_CASES:-$SGMV_DECODE_CASES}" \
            --sweep-variants "${SGMV_SWEEP_VARIANTS:-$SGMV_ROW_VARIANTS}" ;;
    pdl-probe)  # an elementwise Triton kernel after a cuBLAS matmul: plain launch against PDL
        python3 benchmarks/bench_pdl_after_matmul.py ;;
    decode-floor)  # add_lora against single-purpose probe kernels, a one-launch fused probe among them
        (cd benchmarks && python3 bench_decode_floor.py --out "$out/decode-floor") ;;
    engine-rows)  # decode steps with the row-wise SGMV kernels against the tile kernels only (7B)
        python3 benchmarks/bench_engine.py --out "$out/rows" --shapes llama2-7b --batches 16,64 \
            --contexts 256 --popularities backbone,identical,uniform,distinct --no-e2e --peft-new-tokens 0 \
            --compare-sgmv-rows ;;
    profile-engine)  # host profile of eager prefill steps, kernel tables of decode steps (7B shape)
        (cd benchmarks && python3 profile_engine.py --out "$out/profile-engine") ;;
    profile-7b)  # the simulator's H200 profile of the 7B shape, on fleet-assets' model when it is there
        # (carry .gpuwheels/a: the CLI imports grpc_health, which the image lacks)
        lf() { python3 -c 'import sys; from lorafleet.cli import main; sys.exit(main())' "$@"; }
        site_wheels .gpuwheels/a
        model=/tmp/lorafleet-fleetbench/model
        [ -f "$model/config.json" ] || { model=/tmp/lf-7b && lf make-demo --shape llama2-7b --device cuda \
            --num-adapters 8 --overwrite "$model"; } &&
            lf profile --model "$model" --device cuda --no-ray-start --no-serving --engine max_batch_size=64 \
                --engine max_loras=16 --name h200-llama2-7b --out "$out/h200-llama2-7b.yaml" ;;
    fleet-assets)  # the 7B model and adapters ahead of the fleet call (grpc wheels: fleet_gpu_prep.sh)
        site_wheels .gpuwheels/a && python3 benchmarks/bench_fleet.py --assets-only --out "$out/fleet-assets" ;;
    fleet)
        fleet_setup && fleet_bench fleet ${FLEET_ARGS:-} ;;
    fleet-f32)
        fleet_setup && fleet_bench fleet-f32 --kill-dtype float32 --skip migration,delivery ${FLEET_ARGS:-} ;;
    sim-validate)
        lf() { python3 -c 'import sys; from lorafleet.cli import main; sys.exit(main())' "$@"; }
        sv=$out/sim-validate demo=/tmp/lf-simval-demo threads=${SIMVAL_THREADS:-2}
        mkdir -p "$sv" && {
            echo "cores: $(nproc) usable, $(getconf _NPROCESSORS_ONLN) online"
            grep -m1 'model name' /proc/cpuinfo
            uptime
        } | tee "$sv/machine.txt" &&
            fleet_setup && lf make-demo --overwrite "$demo" &&
            lf profile --model "$demo" --device cpu --engine max_batch_size=4 --engine "cpu_threads=$threads" \
                --repeats "${SIMVAL_REPEATS:-20}" --name cpu-validate --out "$sv/profile.yaml" &&
            python3 benchmarks/validate_sim.py --model "$demo" --profile "$sv/profile.yaml" \
                --cpu-threads "$threads" --workers "${SIMVAL_WORKERS:-3}" --rate "${SIMVAL_RATE:-3}" \
                --phase-s "${SIMVAL_PHASE_S:-30}" --output-len 16:64 --out "$sv" &&
            uptime | tee -a "$sv/machine.txt" ;;
    *)
        echo "unknown stage $stage" ;;
    esac >"$out/$stage.log" 2>&1
    rc=$?
    echo "== $stage: rc $rc, $(($(date +%s) - start)) s"
    tail -n 40 "$out/$stage.log"
done
