#!/usr/bin/env bash
# Pre-train with N processes on this machine over 127.0.0.1, each with K CPU devices: a
# multi-host run in miniature (jax.distributed, gloo collectives), to try multi-process code
# without a cluster. Waits for all processes; if one fails, stops the others and exits with
# its exit code (75, the run stopped early after saving, is not a failure: the others stop
# at the same step by themselves).
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-n PROCESSES] [-d DEVICES] [-p PORT] [-t SECONDS] CONFIG WORKDIR [-- EXTRA_FLAGS...]

  -n PROCESSES  number of processes (default 2)
  -d DEVICES    CPU devices per process (default 2)
  -p PORT       coordinator port on 127.0.0.1 (default: a free one)
  -t SECONDS    heartbeat timeout: a silent process is declared dead after this and the
                others stop (default 30)
  CONFIG        a config file with its argument, e.g. configs/cifar10.py:smoke
  WORKDIR       checkpoints and TensorBoard logs; an existing one is resumed
  EXTRA         passed to colormae_jax.main, e.g. --config.batch_size=64

The output of process i is prefixed with [i]. Environment: PYTHON (default python3);
XLA_FLAGS is passed on after the device count. Exit code: 0 when every process finished, 75
when they stopped early after saving (SIGTERM: relaunch to resume), else the first failure's.

Example:
  $(basename "$0") -n 2 -d 2 configs/cifar10.py:smoke /tmp/mae_mp -- --config.total_steps=20
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

help_if_asked "$@"
num=2 devices=2 port="" heartbeat=30
while getopts ":n:d:p:t:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    t) heartbeat="$OPTARG" ;;
    *) common_opt "$opt" ;;
  esac
done
shift $((OPTIND - 1))
is_int "$num" || die "-n must be a positive integer, got '$num'"
is_int "$devices" || die "-d must be a positive integer, got '$devices'"
is_int "$heartbeat" || die "-t must be a positive integer, got '$heartbeat'"
if [[ -n "$port" ]] && ! { is_int "$port" && (( port < 65536 )); }; then die "-p must be a port in 1..65535, got '$port'"; fi
parse_args "$@"
check_config

python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

prefix() {  # line by line, as they come (awk/mawk would buffer its input from a pipe)
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do printf '%s %s\n' "$1" "$line"; done
}

pids=()
stop_all() {  # SIGTERM (the run saves a checkpoint if it can), SIGKILL after 10 s
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  while (( waited < 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
    (( alive )) || return 0
    sleep 1; waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

echo "Starting $num processes x $devices CPU devices, coordinator 127.0.0.1:$port" >&2
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$python" -m colormae_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$i" \
    --cpu_collectives=gloo --heartbeat_timeout="$heartbeat" ${EXTRA[@]+"${EXTRA[@]}"} \
    > >(prefix "[$i]") 2>&1 &
  pids+=("$!")
done

# Wait for every process; the first failure stops the others and gives the exit code.
running=("${pids[@]}") preempted=0
while (( ${#running[@]} > 0 )); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    if wait "$pid"; then rc=0; else rc=$?; fi
    if (( rc == 75 )); then preempted=1; continue; fi  # saved and stopped early: the others follow
    if (( rc != 0 )); then
      echo "A process (pid $pid) exited with status $rc: stopping the others." >&2
      stop_all
      wait || true
      exit "$rc"
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  (( ${#running[@]} == 0 )) || sleep 1
done
wait || true  # the output filters
if (( preempted )); then
  echo "The processes stopped early after saving (exit code 75); relaunch the same command to resume." >&2
  exit 75
fi
echo "All $num processes finished." >&2
