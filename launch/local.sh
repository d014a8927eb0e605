#!/usr/bin/env bash
# Pre-train on this machine (CPU or its GPUs) with a config file, in one process.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") CONFIG WORKDIR [-- EXTRA_FLAGS...]

  CONFIG    a config file with its argument, e.g. configs/cifar10.py:smoke
  WORKDIR   checkpoints and TensorBoard logs; an existing one is resumed
  EXTRA     passed to colormae_jax.main, e.g. --config.batch_size=512

Environment: PYTHON, the interpreter (default python3). Exit code: colormae_jax.main's
(0 finished, 2 bad flags/config/data, 75 stopped early after saving: relaunch to resume).

Example:
  $(basename "$0") configs/cifar10.py:mask=random /tmp/mae_cifar -- --config.total_epochs=100
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
parse_args "$@"
check_config

exec "${PYTHON:-python3}" -m colormae_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
