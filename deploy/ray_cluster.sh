#!/usr/bin/env bash
# Start a Ray cluster for lorafleet and serve on it.
#
#   deploy/ray_cluster.sh head                  # on the head node (runs the API, needs no GPU)
#   deploy/ray_cluster.sh worker HEAD_IP        # on each GPU node: joins with its GPUs
#   deploy/ray_cluster.sh serve CONFIG.yaml     # on the head: lorafleet serve joined to the cluster
#   deploy/ray_cluster.sh stop                  # on any node: stop its Ray processes
#
# Environment: RAY_PORT (default 6379), LORAFLEET (the lorafleet command, default `lorafleet`),
# NUM_GPUS on a worker (default: all visible). Every node needs the same lorafleet install and the
# model and adapter folders at the same paths (a shared file system or a copy).
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
LORAFLEET="${LORAFLEET:-lorafleet}"

usage() {
  sed -n '2,12p' "$0" >&2
  exit 2
}

cmd="${1:-}"
case "$cmd" in
  head)
    # The head keeps no GPU for itself: workers are placed on GPU nodes by their num_gpus=1.
    ray start --head --port "$RAY_PORT" --num-gpus 0 --include-dashboard false
    ;;
  worker)
    [[ $# -ge 2 ]] || usage
    gpus=()
    if [[ -n "${NUM_GPUS:-}" ]]; then gpus=(--num-gpus "$NUM_GPUS"); fi
    ray start --address "$2:$RAY_PORT" ${gpus[@]+"${gpus[@]}"}  # bash < 4.4: empty array + set -u
    ;;
  serve)
    [[ $# -ge 2 ]] || usage
    [[ -f "$2" ]] || { echo "ray_cluster.sh: config file $2 not found" >&2; exit 1; }
    exec "$LORAFLEET" serve --config "$2" --ray-address auto "${@:3}"
    ;;
  stop)
    ray stop
    ;;
  *)
    usage
    ;;
esac
