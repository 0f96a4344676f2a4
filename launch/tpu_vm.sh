#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice, installs this repository on every worker, starts the same
# training command on all of them, follows the log and deletes the TPU. Run `--help` for usage.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# Paths on every worker (the workers' shell expands the ~): the uploaded tarball, the unpacked
# repository, its virtualenv, uv, the training log and the training process id.
# shellcheck disable=SC2088
readonly REMOTE_TARBALL='~/convmixer_jax.tar.gz' REMOTE_DIR='~/convmixer_jax' \
  REMOTE_VENV='~/convmixer_venv' REMOTE_UV='~/.local/bin/uv' REMOTE_LOG='~/convmixer_train.log' \
  REMOTE_PID='~/convmixer_train.pid'

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [-- EXTRA_MAIN_FLAGS...]

Commands:
  create   create the TPU VM / pod slice (--accelerator, optionally --version, --spot, --queued)
  setup    copy the working tree to every worker and install it with the [tpu] extra
  train    start training on every worker in the background (--config, --workdir, --data-dir)
  logs     follow the training log of one worker (--worker, default 0)
  stop     send SIGTERM to training on every worker: it saves a checkpoint and exits
  delete   delete the TPU (with --queued: the queued resource and its TPU)
  all      create, setup, train, then follow the log

Options:
  --name NAME          TPU name (also the queued resource id with --queued)
  --zone ZONE          zone, e.g. us-central2-b (v4), us-east5-a (v5p)
  --project PROJECT    project (default: gcloud's configured project)
  --accelerator TYPE   accelerator type, e.g. v4-8, v4-32, v5p-64, v5litepod-16, v6e-8
  --version VERSION    TPU runtime version (default from the type: v2-v4 tpu-ubuntu2204-base,
                       v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot               Spot capacity: cheaper but preemptible; after a preemption, `delete` then
                       `all` again resumes from the last checkpoint in --workdir
  --queued             request the TPU through queued resources and wait until it is ACTIVE
  --config FILE[:TARGET]  config file relative to the repository root, e.g. configs/cifar10.py
  --workdir URL        gs:// directory for checkpoints and metrics (shared by all workers)
  --data-dir URL       gs:// TFDS data directory (see launch/prepare_imagenet.sh)
  --worker N           worker whose log `logs` follows (default 0)
  --dry-run            print the commands, one per line prefixed with '+ ', instead of running them
  -h, --help           show this help

Everything after `--` is passed to python -m convmixer_jax.main, e.g. -- --config.batch_size=1024

Example (v4-32 pod slice, 4 workers):
  launch/tpu_vm.sh all --name cm --zone us-central2-b --accelerator v4-32 \
      --config configs/convmixer_1536_20.py --workdir gs://BUCKET/runs/cm1536 \
      --data-dir gs://BUCKET/tfds
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo 'tpu-ubuntu2204-base' ;;
    v5p-*) echo 'v2-alpha-tpuv5' ;;
    v5litepod-*) echo 'v2-alpha-tpuv5-lite' ;;
    v6e-*) echo 'v2-alpha-tpuv6e' ;;
    *) die "no default runtime version for $1; pass --version" ;;
  esac
}

# gcloud flags every TPU command takes.
location_flags() {
  loc=("--zone=$zone")
  [[ -z $project ]] || loc+=("--project=$project")
}

# Joins shell commands into one line, separated by '; '.
sequence() {
  local out=$1 step
  for step in "${@:2}"; do
    out+="; $step"
  done
  printf '%s' "$out"
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all --command="$1"
}

cmd_create() {
  [[ -n $accelerator ]] || die 'create needs --accelerator (e.g. v4-32)'
  [[ $accelerator =~ ^[a-z0-9]+-[0-9]+$ ]] ||
    die "--accelerator $accelerator is not an accelerator type like v4-32 or v5p-64"
  local runtime=$version
  [[ -n $runtime ]] || runtime=$(default_version "$accelerator")
  local capacity=()
  ((!spot)) || capacity=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" "${loc[@]}" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$runtime" "${capacity[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$name" "${loc[@]}" \
      --accelerator-type="$accelerator" --version="$runtime" "${capacity[@]}"
  fi
}

# Polls the queued resource until its TPU is provisioned.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${loc[@]}"
    '--format=value(state.state)')
  if ((dry_run)); then
    run "${describe[@]}"
    return
  fi
  local state
  while :; do
    state=$(run "${describe[@]}")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $name is $state" ;;
    esac
    printf 'queued resource %s is %s; checking again in 60 s\n' "$name" "$state" >&2
    sleep 60
  done
}

cmd_setup() {
  local tarball="${TMPDIR:-/tmp}/convmixer_jax-$name.tar.gz"
  run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=.venv-aot --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude=runs \
    -C "$REPO" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:convmixer_jax.tar.gz" "${loc[@]}" \
    --worker=all
  # TPU VM images ship Python 3.10; uv provides the 3.11 this package needs.
  ssh_all "$(sequence 'set -e' "rm -rf $REMOTE_DIR" "mkdir -p $REMOTE_DIR" \
    "tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR" \
    'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv' \
    "$REMOTE_UV venv -q --clear --python 3.11 $REMOTE_VENV" "cd $REMOTE_DIR" \
    "$REMOTE_UV pip install -q --python $REMOTE_VENV/bin/python -e \".[tpu]\"")"
}

check_train_args() {
  [[ -n $config ]] || die 'train needs --config (e.g. configs/convmixer_1536_20.py)'
  [[ -f $REPO/${config%%:*} ]] ||
    die "--config ${config%%:*} is not a file relative to the repository root"
  [[ $workdir == gs://?* ]] || die "--workdir must be a gs:// URL that every worker can write"
  [[ $data_dir == gs://?* ]] || die "--data-dir must be a gs:// URL that every worker can read"
}

cmd_train() {
  check_train_args
  local main
  # --multihost: every worker joins jax.distributed (Cloud TPU supplies the coordinator).
  main=$(join_quoted -m convmixer_jax.main --multihost --config "$config" --workdir "$workdir" \
    "--config.data_dir=$data_dir" "${extra[@]}")
  # nohup keeps training alive after ssh returns; the pid lets `stop` signal it.
  ssh_all "cd $REMOTE_DIR || exit 1; nohup $REMOTE_VENV/bin/python $main > $REMOTE_LOG 2>&1 \
< /dev/null & echo \$! > $REMOTE_PID"
}

cmd_logs() {
  [[ $worker =~ ^[0-9]+$ ]] || die "--worker $worker is not a worker number"
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker="$worker" \
    --command="tail -n 200 -F $REMOTE_LOG"
}

cmd_stop() {
  ssh_all "kill -TERM \"\$(cat $REMOTE_PID)\""
}

cmd_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet
  fi
}

main() {
  dry_run=0 spot=0 queued=0
  command='' name='' zone='' project='' accelerator='' version=''
  config='' workdir='' data_dir='' worker=0
  extra=()
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --dry-run) dry_run=1; shift ;;
      --spot) spot=1; shift ;;
      --queued) queued=1; shift ;;
      --name) take name "$@"; shift 2 ;;
      --zone) take zone "$@"; shift 2 ;;
      --project) take project "$@"; shift 2 ;;
      --accelerator) take accelerator "$@"; shift 2 ;;
      --version) take version "$@"; shift 2 ;;
      --config) take config "$@"; shift 2 ;;
      --workdir) take workdir "$@"; shift 2 ;;
      --data-dir) take data_dir "$@"; shift 2 ;;
      --worker) take worker "$@"; shift 2 ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z $command ]] || die "unexpected argument $1 (see --help)"
        command=$1
        shift
        ;;
    esac
  done
  case $command in
    create | setup | train | logs | stop | delete | all) ;;
    '') die 'missing command: create, setup, train, logs, stop, delete or all (see --help)' ;;
    *) die "unknown command $command: use create, setup, train, logs, stop, delete or all" ;;
  esac
  [[ -n $name ]] || die '--name is required'
  [[ -n $zone ]] || die '--zone is required'
  location_flags
  if [[ $command == all ]]; then
    check_train_args # before paying for a TPU
    cmd_create
    cmd_setup
    cmd_train
    cmd_logs
  else
    "cmd_$command"
  fi
}

main "$@"
