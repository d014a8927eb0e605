#!/usr/bin/env bash
# Downloads, here, the wheels that the lent GPU machines lack (Python 3.12, manylinux x86-64)
# into .whl/ (git-ignored), for `run` calls that carry it (see launch/gpu_session.sh).
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-h]

Writes .whl/ with grain, ml-collections, clu, tensorflow-datasets, array-record, tensorboardX
and the dependencies the GPU image does not have (no other argument), and .whl/pinned/ with
our pinned flax, optax and orbax-checkpoint (the image has its own versions; PINNED=1 in
launch/gpu_session.sh installs ours over them). Environment: PYTHON, the interpreter that
runs pip (default python3).
USAGE
}

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then usage; exit 0; fi
if [[ $# -gt 0 ]]; then echo "error: no argument expected, got $*" >&2; usage >&2; exit 2; fi
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
mkdir -p .whl
pkgs=(grain==0.2.18 ml-collections==1.1.0 clu==0.0.12 tensorflow-datasets==4.9.10 array-record==0.8.6
      tensorboardX==2.6.5 portpicker dm-tree immutabledict simple-parsing tensorflow-metadata termcolor
      toml docstring-parser googleapis-common-protos)
download() {  # DIR PACKAGE
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$1" "$2"
}
for p in "${pkgs[@]}"; do download .whl "$p"; done
mkdir -p .whl/pinned
for p in flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8; do download .whl/pinned "$p"; done
# pure-Python packages published as sources only: build their wheels here
"$python" -m pip wheel -q --no-deps -w .whl promise
ls -la .whl .whl/pinned
