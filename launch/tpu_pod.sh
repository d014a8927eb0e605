#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM pod: the same command on every worker (one process per host);
# jax.distributed finds the pod by itself (colormae_jax.main starts it when it detects one).
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-c] [-a TYPE] [-v VERSION] [-s SOURCE] [-i] [-b] [-r] [-n] NAME ZONE CONFIG WORKDIR [-- EXTRA_FLAGS...]

Steps, each on every worker of TPU VM NAME (gcloud compute tpus tpu-vm ssh --worker=all):
  1. with -c: create it (gcloud compute tpus tpu-vm create NAME --zone ZONE
     --accelerator-type TYPE --version VERSION);
  2. copy SOURCE (default: this repository, without .git) to ~/colormae_jax;
  3. pip install -e . "jax[tpu]" there (skipped with -i);
  4. \$PYTHON -m colormae_jax.main --config=CONFIG --workdir=WORKDIR EXTRA (PYTHON: the
     interpreter on the workers, default python3).

  -c          create the TPU VM first
  -a TYPE     accelerator type for -c (default v4-128: 64 chips, 16 hosts)
  -v VERSION  TPU VM runtime for -c (default tpu-ubuntu2204-base)
  -s SOURCE   the checkout to copy (default: $(cd "$(dirname "$0")/.." && pwd))
  -i          skip the install (already done on every worker)
  -b          run in the background on the workers (nohup; log in ~/colormae_train.log),
              so that the run survives this terminal
  -r          relaunch on every worker while the run exits with 75 (it stopped early after
              saving, e.g. on SIGTERM): each relaunch resumes; any other exit code ends it
  -n          print the commands instead of running them
  NAME ZONE   the TPU VM and its zone, e.g. mae-pod us-central2-b
  CONFIG      a config file inside SOURCE, with its argument, e.g. configs/imagenet.py:mask=green
  WORKDIR     gs://BUCKET/PATH: every worker writes its shards of the checkpoints there
  EXTRA       passed to colormae_jax.main, e.g. --config.data.data_dir=gs://BUCKET/tfds

Example:
  $(basename "$0") -c mae-pod us-central2-b configs/imagenet.py:mask=random gs://my-bucket/mae_b16 \\
      -- --config.data.data_dir=gs://my-bucket/tfds
USAGE
}

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

help_if_asked "$@"
create=0 type="v4-128" version="tpu-ubuntu2204-base" src="$(cd "$(dirname "$0")/.." && pwd)"
install=1 background=0 relaunch=0 dry_run=0
while getopts ":ca:v:s:ibrnh" opt; do
  case "$opt" in
    c) create=1 ;;
    a) type="$OPTARG" ;;
    v) version="$OPTARG" ;;
    s) src="$OPTARG" ;;
    i) install=0 ;;
    b) background=1 ;;
    r) relaunch=1 ;;
    n) dry_run=1 ;;
    *) common_opt "$opt" ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 4 ]]; then die "NAME, ZONE, CONFIG and WORKDIR are required"; fi
name="$1"; zone="$2"; shift 2
parse_args "$@"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "NAME '$name': lower-case letters, digits and -, starting with a letter"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "ZONE '$zone' is not a zone, e.g. us-central2-b"
[[ "$type" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "-a '$type' is not an accelerator type, e.g. v4-128"
[[ -d "$src" ]] || die "source '$src' is not a directory"
[[ -f "$src/${CONFIG%%:*}" ]] || die "config file ${CONFIG%%:*} not found in $src (CONFIG is relative to SOURCE)"
[[ "$WORKDIR" == gs://?* ]] || die "WORKDIR must be gs://BUCKET/PATH, shared by every worker; got '$WORKDIR'"
python="${PYTHON:-python3}"
if (( ! dry_run )) && ! command -v gcloud > /dev/null; then
  echo "error: gcloud not found; install the Google Cloud CLI (or use -n to print the commands)" >&2
  exit 1
fi

run() {  # runs (or prints, with -n) one command
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {  # one shell command line on every worker
  run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

if (( create )); then
  run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" --version="$version"
fi

tarball="${TMPDIR:-/tmp}/colormae_jax_src.tgz"
run tar -C "$src" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$name:colormae_jax_src.tgz" --zone="$zone" --worker=all
on_all_workers "rm -rf ~/colormae_jax && mkdir -p ~/colormae_jax && tar -xzf ~/colormae_jax_src.tgz -C ~/colormae_jax"
if (( install )); then
  on_all_workers "cd ~/colormae_jax && $(printf '%q' "$python") -m pip install -q -e . 'jax[tpu]'"
fi

train="$(printf '%q ' "$python" -m colormae_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
if (( relaunch )); then  # 75: colormae_jax.main stopped early after saving a checkpoint
  train="while true; do $train; rc=\$?; if [ \$rc -ne 75 ]; then exit \$rc; fi; echo 'Stopped early (exit 75): relaunching in 10 s.' >&2; sleep 10; done"
fi
if (( background )); then
  on_all_workers "cd ~/colormae_jax && nohup bash -c $(printf '%q' "$train") > ~/colormae_train.log 2>&1 < /dev/null &"
  echo "Started on every worker of $name; logs: ~/colormae_train.log on each (worker 0 has the metrics)." >&2
else
  on_all_workers "cd ~/colormae_jax && $train"
fi
