# shellcheck shell=bash
# Sourced by the launch scripts, after they define usage(): help, errors, and the
# CONFIG WORKDIR [-- EXTRA_FLAGS...] arguments that end their command lines.

die() { echo "error: $*" >&2; usage >&2; exit 2; }

# help_if_asked ARGS...: -h or --help as the first argument prints the usage and exits 0.
help_if_asked() { if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi; }

# common_opt OPT: the cases a silent getopts loop (":...h") shares, after the script's own.
common_opt() {
  case "$1" in
    h) usage; exit 0 ;;
    :) die "option -$OPTARG needs a value" ;;
    *) die "unknown option -$OPTARG" ;;
  esac
}

# parse_args ARGS...: CONFIG WORKDIR [-- EXTRA_FLAGS...] into CONFIG, WORKDIR and the array
# EXTRA. Expand it as ${EXTRA[@]+"${EXTRA[@]}"}: under set -u, bash < 4.4 (macOS's) takes an
# empty array for an unset variable.
# shellcheck disable=SC2034  # the variables are for the caller
parse_args() {
  if [[ $# -lt 2 ]]; then die "CONFIG and WORKDIR are required"; fi
  CONFIG="$1" WORKDIR="$2"; shift 2
  if [[ $# -gt 0 ]]; then
    [[ "$1" == "--" ]] || die "extra flags go after --"
    shift
  fi
  [[ -n "$WORKDIR" ]] || die "WORKDIR is empty"  # main would take the current directory
  EXTRA=("$@")
}

# check_config: CONFIG's file (before its first ':') exists, relative to the current directory.
check_config() { [[ -f "${CONFIG%%:*}" ]] || die "config file ${CONFIG%%:*} not found"; }
