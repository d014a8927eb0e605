#!/usr/bin/env bash
# Pre-train on the GPUs of one node: one process drives all of them (the batch and the
# config's mesh span every visible GPU). For several nodes see docs/multihost.md.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-g GPU_IDS] [-m FRACTION] [-n] CONFIG WORKDIR [-- EXTRA_FLAGS...]

  -g GPU_IDS   the GPUs to use, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES; default: all)
  -m FRACTION  share of each GPU's memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION,
               default 0.90; JAX's own default is 0.75)
  -n           print the environment and the command instead of running them
  CONFIG       a config file with its argument, e.g. configs/imagenet.py:mask=random
  WORKDIR      checkpoints and TensorBoard logs (a local path or gs://); resumed if it exists
  EXTRA        passed to colormae_jax.main, e.g. --config.batch_size=1024

Environment: PYTHON, the interpreter (default python3). Exit code: colormae_jax.main's
(0 finished, 2 bad flags/config/data, 75 stopped early after saving: relaunch to resume).

XLA flags set here: $GPU_XLA_FLAGS
(then any XLA_FLAGS of the environment, which win).

Example:
  $(basename "$0") -g 0,1,2,3 configs/imagenet.py:mask=green /data/runs/mae_b16 -- --config.data.data_dir=/data/tfds
USAGE
}

# Overlap the collectives (gradient all-reduce, fsdp gathers) with compute.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
gpus="" fraction="0.90" dry_run=0
while getopts ":g:m:nh" opt; do
  case "$opt" in
    g) gpus="$OPTARG" ;;
    m) fraction="$OPTARG" ;;
    n) dry_run=1 ;;
    *) common_opt "$opt" ;;
  esac
done
shift $((OPTIND - 1))
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "-g must be comma-separated GPU ids, e.g. 0,1, got '$gpus'"
[[ "$fraction" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] || die "-m must be a fraction in (0, 1], got '$fraction'"
parse_args "$@"
check_config

export XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction"
export XLA_FLAGS="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
if [[ -n "$gpus" ]]; then export CUDA_VISIBLE_DEVICES="$gpus"; fi
cmd=("${PYTHON:-python3}" -m colormae_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})

if (( dry_run )); then
  echo "XLA_FLAGS=$XLA_FLAGS"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  if [[ -n "$gpus" ]]; then echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; fi
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
