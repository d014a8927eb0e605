#!/usr/bin/env bash
# The commands a lent GPU machine runs (device `run` tool), one stage per call (each call <= 10 min).
#
# Here, once per session:  bash launch/gpu_wheels.sh; mkdir -p .data
#   cp -r ../shared/data/cifar10 .data/; cp ../shared/bench/torch_mae_ref.py .data/
# Then, on the device (what travels is capped at 64 MiB: carry .data alone first, then .whl; ignored
# paths stay on the machine while it is warm, about 30 s after each call):
#   run(command='bash launch/gpu_session.sh setup', carry=['.data'])
#   run(command='bash launch/gpu_session.sh perf', carry=['.whl'])
#   run(command='bash launch/gpu_session.sh study random,green 540', carry=['.whl'])   # repeat to resume
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") STAGE [ARGS]

  setup                       check that the data arrived (.data/cifar10) and the GPU is seen
  perf                        benchmarks/perf.py (ViT-B/16, every target of issue 8) -> \$OUT;
                              rerun it (warm machine: compilations cached) for what the
                              500 s budget skipped, e.g. PERF_FLAGS="--only=famt --no_torch"
  study STRATEGIES SECONDS    the CIFAR-10 full study for STRATEGIES (comma list) within SECONDS;
                              resumable: run it again on the same (warm) machine to continue
  tests                       the CPU-independent tests on the GPU backend

Wheels in .whl/ are installed into /tmp/site first when present; with PINNED=1 also
.whl/pinned/ (our pinned flax, optax, orbax-checkpoint over the image's own versions).
Environment: PYTHON, the interpreter (default python3); OUT, where results go (/tmp/out).
USAGE
}

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then echo "error: give a STAGE" >&2; usage >&2; exit 2; fi
cd "$(dirname "$0")/.."
stage="$1"; shift
case "$stage" in
  setup|perf|tests) [[ $# -eq 0 ]] || { echo "error: $stage takes no argument" >&2; usage >&2; exit 2; } ;;
  study) [[ $# -eq 2 && "$2" =~ ^[0-9]+$ ]] || {
    echo "error: study needs STRATEGIES SECONDS (an integer)" >&2; usage >&2; exit 2; } ;;
  *) echo "error: unknown stage $stage" >&2; usage >&2; exit 2 ;;
esac
out="${OUT:-/tmp/out}"; mkdir -p "$out"
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  wheels=(.whl/*.whl)
  if [[ "${PINNED:-0}" == 1 ]]; then wheels+=(.whl/pinned/*.whl); fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TFDS_DATA_DIR="$PWD/.tfds"
# Compiled programs persist on the warm machine between calls (a git-ignored folder).
export JAX_COMPILATION_CACHE_DIR="$PWD/.cache/jax"

case "$stage" in
  setup)
    find .data/cifar10 -maxdepth 1 -mindepth 1 -type d
    nvidia-smi -L
    "$python" -c 'import jax; print(jax.__version__, jax.devices())'
    "$python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
def v(p):
    try:
        return version(p)
    except PackageNotFoundError:
        return 'missing'
print({p: v(p) for p in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'torch')})
PY
    ;;
  perf)
    # a call may run 600 s: start nothing after 500 s; results are written after every row
    read -r -a perf_flags <<< "${PERF_FLAGS:-}"
    "$python" benchmarks/perf.py --out "$out" --torch_ref .data/torch_mae_ref.py --budget_s 500 \
      ${perf_flags[@]+"${perf_flags[@]}"} 2>&1 |
      tee "$out/perf.log" ;;
  study)
    "$python" benchmarks/cifar10_study.py --preset full --strategies "$1" --root .data/cifar10 \
      --data_dir "$PWD/.tfds" --out .study --time_budget_s "$2" 2>&1 | tail -40 | tee "$out/study.log"
    cp .study/results.json .study/results.md "$out/" 2>/dev/null || true
    cp .study/study.png "$out/" 2>/dev/null || true ;;
  tests)
    JAX_PLATFORMS=cuda "$python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_masking.py \
      tests/test_colour.py tests/test_famt.py -k "not tool and not bad" 2>&1 | tee "$out/tests.log" ;;
esac
