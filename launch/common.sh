# shellcheck shell=bash
# Helpers of the launch scripts, sourced by gpu.sh, tpu_vm.sh and prepare_imagenet.sh; slurm.sbatch
# holds a copy (sbatch runs a copy of the job script away from the repository), which
# tests/test_launch.py keeps identical to this file.

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# Quotes one word for a POSIX shell exactly like Python's shlex.quote.
quote() {
  if [[ -n $1 && $1 != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# Joins words into one shell-quoted command line.
join_quoted() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Prints a command as '+ CMD' to stderr, like `set -x`, and runs it; when the script has set
# dry_run=1 (--dry-run), prints it to stdout instead and does not run it.
run() {
  if ((${dry_run:-0})); then
    printf '+ %s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# take VAR FLAG [VALUE]: stores the value that follows FLAG.
take() {
  [[ $# -ge 3 && $3 != --* ]] || die "$2 needs a value"
  printf -v "$1" '%s' "$3"
}
