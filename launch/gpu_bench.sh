#!/usr/bin/env bash
# Benchmarks a fresh GPU machine: install, check the GPU, the model/masking tests on it, the
# performance harness (benchmarks/perf.py) and the CIFAR-10 masking study; results under OUT.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-s STAGE] [-d DATA] [-o OUT] [-m MINUTES] [-t TORCH_REF] [-k STRATEGIES]

Runs, in order, the stages install, check, tests, perf, study (or only STAGE) on this machine's
GPU, from the repository root. Every stage writes its log and results under OUT as it goes.

  -s STAGE       all (default), install, check, tests, perf or study
  -d DATA        the CIFAR-10 JPEG folder, DATA/{train,test}/<class>/*.jpg (study; default
                 ../shared/data/cifar10)
  -o OUT         results folder (default gpu_results): perf/ (<device>.json), study/
                 (results.json, results.md, study.png) and a log per stage
  -m MINUTES     time limit of the perf and study stages, each (default 9). Both stop by
                 themselves before it, keep what finished, and resume where they stopped when run
                 again with the same OUT: on a machine or a scheduler that grants slots of under
                 10 minutes, run one stage per slot and repeat the study until it says it is done
  -t TORCH_REF   the PyTorch MAE step to time beside ours (perf; default
                 ../shared/bench/torch_mae_ref.py; skipped when absent)
  -k STRATEGIES  the study's masks, comma separated (default random,green,famt,amt)

install puts this package, its tested versions (constraints.txt), torch and jax's CUDA 12
wheels into the current Python environment; skip it (-s check, ...) where they are already
there. Environment: PYTHON, the interpreter (default python3).
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"

stage=all data=../shared/data/cifar10 out=gpu_results minutes=9 torch_ref=../shared/bench/torch_mae_ref.py
strategies=random,green,famt,amt
while getopts ":s:d:o:m:t:k:h" opt; do
  case "$opt" in
    s) stage="$OPTARG" ;;
    d) data="$OPTARG" ;;
    o) out="$OPTARG" ;;
    m) minutes="$OPTARG" ;;
    t) torch_ref="$OPTARG" ;;
    k) strategies="$OPTARG" ;;
    *) common_opt "$opt" ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected argument $1"
case "$stage" in all|install|check|tests|perf|study) ;; *) die "unknown stage $stage" ;; esac
[[ "$minutes" =~ ^[1-9][0-9]*$ ]] || die "-m MINUTES must be a positive integer, got $minutes"
[[ "$strategies" =~ ^[a-z]+(,[a-z]+)*$ ]] || die "-k STRATEGIES must be names separated by commas, got $strategies"

cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
budget=$((minutes * 60 - 60))  # start nothing new in the last minute
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$out/.jax_cache"
want() { [[ "$stage" == all || "$stage" == "$1" ]]; }
log() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$out/stages.log"; }

if want install; then
  log "install"
  jax_version="$(sed -n 's/^jax==//p' constraints.txt)"
  "$python" -m pip install -q -e ".[torch]" -c constraints.txt 2>&1 | tee "$out/install.log"
  "$python" -m pip install -q "jax[cuda12]==$jax_version" 2>&1 | tee -a "$out/install.log"
fi
if want check; then
  log "check"
  { nvidia-smi -L || true; "$python" -c 'import jax; print(jax.__version__, jax.devices())'; } 2>&1 |
    tee "$out/check.log"
  backend="$("$python" -c 'import jax; print(jax.default_backend())')"
  [[ "$backend" == gpu ]] || { echo "error: jax sees no GPU (backend $backend); check the CUDA install" >&2; exit 1; }
fi
if want tests; then
  log "tests"
  JAX_PLATFORMS=cuda "$python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_masking.py \
    tests/test_colour.py tests/test_famt.py -k "not tool and not bad" 2>&1 | tee "$out/tests.log"
fi
if want perf; then
  log "perf (at most $minutes min)"
  ref=(--no_torch)
  if [[ -f "$torch_ref" ]]; then ref=(--torch_ref "$torch_ref"); fi
  "$python" benchmarks/perf.py --out "$out/perf" "${ref[@]}" --budget_s "$budget" 2>&1 | tee "$out/perf.log"
fi
if want study; then
  log "study $strategies (at most $minutes min; run again to continue)"
  [[ -d "$data/train" ]] || { echo "error: $data/train: no such folder; give the CIFAR-10 folder with -d" >&2; exit 2; }
  "$python" benchmarks/cifar10_study.py --preset full --strategies "$strategies" --root "$data" \
    --data_dir "$out/tfds" --out "$out/study" --time_budget_s "$budget" 2>&1 | tail -40 | tee "$out/study.log"
fi
log "done: $stage"
