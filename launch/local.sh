#!/usr/bin/env bash
# Pre-train on this machine (CPU or its GPUs) with a config file, in one process.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") CONFIG WORKDIR [-- EXTRA_FLAGS...]

  CONFIG    a config file with its argument, e.g. configs/cifar10.py:smoke
  WORKDIR   checkpoints and TensorBoard logs; an existing one is resumed
  EXTRA     passed to colormae_jax.main, e.g. --config.batch_size=512

Example:
  $(basename "$0") configs/cifar10.py:mask=random /tmp/mae_cifar -- --config.total_epochs=100
USAGE
}

die() { echo "error: $*" >&2; usage >&2; exit 2; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then die "CONFIG and WORKDIR are required"; fi
config="$1"; workdir="$2"; shift 2
if [[ $# -gt 0 ]]; then
  [[ "$1" == "--" ]] || die "extra flags go after --"
  shift
fi
[[ -f "${config%%:*}" ]] || die "config file ${config%%:*} not found"

exec "${PYTHON:-python3}" -m colormae_jax.main --config="$config" --workdir="$workdir" "$@"
