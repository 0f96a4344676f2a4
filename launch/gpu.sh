#!/usr/bin/env bash
# Installs this repository with the CUDA extra and trains on every GPU of one host: one process,
# JAX sees all local GPUs and shards each batch across them. Run `--help` for usage.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config FILE --workdir DIR [options] [-- EXTRA_MAIN_FLAGS...]

Options:
  --config FILE         config file, e.g. configs/convmixer_1536_20.py
  --workdir DIR         directory (or gs:// URL) for checkpoints, metrics and TensorBoard
  --data-dir DIR        TFDS data directory (local or gs://; default: TFDS's ~/tensorflow_datasets)
  --python PYTHON       interpreter to install into and run (default: python3; use a virtualenv's)
  --gpus LIST           GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
  --mem-fraction F      share of each GPU's memory JAX preallocates (default 0.90; JAX's own is
                        0.75, and TensorFlow, used only for input, is kept off the GPUs)
  --no-install          skip `pip install -e .[cuda]`
  --dry-run             print the commands, one per line prefixed with '+ ', instead of running them
  -h, --help            show this help

Everything after `--` is passed to python -m convmixer_jax.main, e.g. -- --config.batch_size=1024

Example (8xH100):
  launch/gpu.sh --python .venv/bin/python --config configs/convmixer_1536_20.py \
      --workdir runs/cm1536 --data-dir /data/tensorflow_datasets
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  dry_run=0 install=1
  config='' workdir='' data_dir='' python=python3 gpus='' mem_fraction=0.90
  extra=()
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --dry-run) dry_run=1; shift ;;
      --no-install) install=0; shift ;;
      --config) take config "$@"; shift 2 ;;
      --workdir) take workdir "$@"; shift 2 ;;
      --data-dir) take data_dir "$@"; shift 2 ;;
      --python) take python "$@"; shift 2 ;;
      --gpus) take gpus "$@"; shift 2 ;;
      --mem-fraction) take mem_fraction "$@"; shift 2 ;;
      *) die "unexpected argument $1 (see --help)" ;;
    esac
  done
  [[ -n $config ]] || die '--config is required (e.g. configs/convmixer_1536_20.py)'
  [[ -f ${config%%:*} ]] || die "--config ${config%%:*} is not a file"
  [[ -n $workdir ]] || die '--workdir is required'
  [[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus $gpus is not a list like 0,1,2,3"
  [[ $mem_fraction =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
    die "--mem-fraction $mem_fraction is not a number in (0, 1]"

  ((!install)) || run "$python" -m pip install -q -e "${REPO}[cuda]"
  local env=(env)
  [[ -z $gpus ]] || env+=("CUDA_VISIBLE_DEVICES=$gpus")
  env+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
  local flags=(--config "$config" --workdir "$workdir")
  [[ -z $data_dir ]] || flags+=("--config.data_dir=$data_dir")
  run "${env[@]}" "$python" -m convmixer_jax.main "${flags[@]}" "${extra[@]}"
}

main "$@"
