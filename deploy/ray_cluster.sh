#!/usr/bin/env bash
# Start a Ray cluster for lorafleet by hand, serve on it, and stop only what this script started.
#
#   deploy/ray_cluster.sh head                  # on the head node (runs the API, needs no GPU)
#   deploy/ray_cluster.sh worker HEAD_IP        # on each GPU node: joins with its GPUs
#   deploy/ray_cluster.sh serve CONFIG.yaml     # on the head: lorafleet serve joined to this head
#   deploy/ray_cluster.sh stop                  # on any node: stop the Ray processes started here
#   deploy/ray_cluster.sh pids                  # list them (pid and command)
#
# Environment: RAY_PORT (default 6379), LORAFLEET (the lorafleet command, default `lorafleet`),
# NUM_GPUS / NUM_CPUS (default: all visible), RAY_START_ARGS (more `ray start` flags, e.g. ports),
# LORAFLEET_RAY_DIR (this node's Ray temp dir, default /tmp/lorafleet-ray; give each node that
# shares a machine its own). Every node needs the same lorafleet install and the model and adapter
# folders at the same paths (a shared file system or a copy).
#
# `stop` never runs `ray stop` (which ends every Ray process on the machine, other users' too): it
# ends the processes whose command line names LORAFLEET_RAY_DIR, plus their children (Ray's workers
# rename themselves `ray::...`), and nothing else.
#
# Token authentication: Ray (>= 2.52) checks a shared token on every RPC when RAY_AUTH_MODE=token;
# Ray 2.59 turns it on by default for clusters started on one machine, 2.61 for all. This script
# sets RAY_AUTH_MODE=token unless you set it (RAY_AUTH_MODE=disabled on every node opts out, on a
# trusted network only). The token comes from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
# else ~/.ray/auth_token. `head` creates ~/.ray/auth_token when there is none
# (`ray get-auth-token --generate`); copy that file (or export RAY_AUTH_TOKEN) to every worker
# node before `worker`, and keep it for `serve`. A node or a `lorafleet serve` with another token
# is refused (InvalidAuthToken): lorafleet reports that as one error line naming these settings.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
LORAFLEET="${LORAFLEET:-lorafleet}"
RAY_DIR="${LORAFLEET_RAY_DIR:-/tmp/lorafleet-ray}"
RAY_DIR="${RAY_DIR%/}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Ray's Unix sockets live at DIR/session_<date>_<pid>/sockets/...; a socket path over 107 bytes fails.
MAX_RAY_DIR_LEN=40

usage() {
  sed -n '2,9p' "$0" >&2
  exit 2
}

die() {
  echo "ray_cluster.sh: $*" >&2
  exit 1
}

have_token() {
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && { [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is empty or missing"; return 0; }
  [[ -s "$HOME/.ray/auth_token" ]]
}

need_token() {
  [[ "$RAY_AUTH_MODE" == token ]] || return 0
  have_token || die "token auth is on (RAY_AUTH_MODE=token) but there is no token here: copy the head's ~/.ray/auth_token to $HOME/.ray/auth_token, or export RAY_AUTH_TOKEN (RAY_AUTH_MODE=disabled on every node turns auth off)"
}

# PIDs of this node's Ray: command lines naming "$RAY_DIR/", then their descendants.
our_pids() {
  local -A ours=()
  local -A parent=()
  local dir pid stat rest cmd
  for dir in /proc/[0-9]*; do
    pid="${dir#/proc/}"
    stat="$(cat "$dir/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"  # fields after the command name, which may hold spaces
    read -r _ ppid _ <<<"$rest"
    parent[$pid]="$ppid"
    cmd="$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null)" || continue
    [[ "$cmd" == *"$RAY_DIR/"* || "$cmd" == *"$RAY_DIR "* ]] && ours[$pid]=1
  done
  local grew=1
  while ((grew)); do
    grew=0
    for pid in "${!parent[@]}"; do
      if [[ -z "${ours[$pid]:-}" && -n "${ours[${parent[$pid]}]:-}" ]]; then
        ours[$pid]=1
        grew=1
      fi
    done
  done
  unset "ours[$$]" "ours[$BASHPID]"  # this script's own process may name the directory
  ((${#ours[@]})) && printf '%s\n' "${!ours[@]}" | sort -n
  return 0
}

record_pids() {
  our_pids >"$RAY_DIR/lorafleet.pids"
  echo "ray_cluster.sh: $(wc -l <"$RAY_DIR/lorafleet.pids") Ray processes recorded in $RAY_DIR/lorafleet.pids" >&2
}

alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done
  return 0
}

stop_ours() {
  local pids
  # Found afresh, not read from lorafleet.pids: a recorded PID may since belong to someone else,
  # and workers started later are missing from the record.
  mapfile -t pids < <(our_pids)
  if ((${#pids[@]} == 0)); then
    echo "ray_cluster.sh: no Ray processes of $RAY_DIR are running" >&2
    rm -f "$RAY_DIR/lorafleet.pids"
    return 0
  fi
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local tries=0
  while ((tries < 50)); do  # up to 10 s for a clean exit
    mapfile -t pids < <(alive "${pids[@]}")
    ((${#pids[@]} == 0)) && break
    sleep 0.2
    tries=$((tries + 1))
  done
  if ((${#pids[@]})); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
  # Anything of ours that started meanwhile (a worker forked during the TERM) goes too.
  mapfile -t pids < <(our_pids)
  if ((${#pids[@]})); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
  rm -f "$RAY_DIR/lorafleet.pids"
  echo "ray_cluster.sh: stopped the Ray processes of $RAY_DIR" >&2
}

check_dir_length() {
  if ((${#RAY_DIR} > MAX_RAY_DIR_LEN)); then
    die "LORAFLEET_RAY_DIR=$RAY_DIR is longer than $MAX_RAY_DIR_LEN characters: Ray's socket paths under it would pass the 107-byte limit"
  fi
}

start_args() {
  local args=(--temp-dir "$RAY_DIR" --disable-usage-stats)
  if [[ -n "${NUM_CPUS:-}" ]]; then args+=(--num-cpus "$NUM_CPUS"); fi
  # RAY_START_ARGS is split on spaces on purpose: it carries several flags.
  # shellcheck disable=SC2206
  if [[ -n "${RAY_START_ARGS:-}" ]]; then args+=($RAY_START_ARGS); fi
  printf '%s\n' "${args[@]}"
}

cmd="${1:-}"
case "$cmd" in
  head)
    check_dir_length
    mkdir -p "$RAY_DIR"
    if [[ "$RAY_AUTH_MODE" == token ]] && ! have_token; then
      ray get-auth-token --generate >/dev/null
      echo "ray_cluster.sh: created a Ray auth token in ~/.ray/auth_token; copy it to every node" >&2
    fi
    mapfile -t extra < <(start_args)
    # The head keeps no GPU for itself: workers are placed on GPU nodes by their num_gpus=1.
    ray start --head --port "$RAY_PORT" --num-gpus 0 --include-dashboard false "${extra[@]}"
    record_pids
    ;;
  worker)
    [[ $# -ge 2 ]] || usage
    need_token
    check_dir_length
    mkdir -p "$RAY_DIR"
    mapfile -t extra < <(start_args)
    if [[ -n "${NUM_GPUS:-}" ]]; then extra+=(--num-gpus "$NUM_GPUS"); fi
    ray start --address "$2:$RAY_PORT" "${extra[@]}"
    record_pids
    ;;
  serve)
    [[ $# -ge 2 ]] || usage
    [[ -f "$2" ]] || die "config file $2 not found"
    need_token
    # The head's own address as `ray start` recorded it: "auto" could pick another user's cluster
    # on a shared machine.
    [[ -s "$RAY_DIR/ray_current_cluster" ]] || die "no head started here ($RAY_DIR/ray_current_cluster missing): run '$0 head' first"
    exec "$LORAFLEET" serve --config "$2" --ray-address "$(cat "$RAY_DIR/ray_current_cluster")" "${@:3}"
    ;;
  stop)
    stop_ours
    ;;
  pids)
    while read -r pid; do
      printf '%s %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
    done < <(our_pids)
    ;;
  *)
    usage
    ;;
esac
