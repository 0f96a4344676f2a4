#!/usr/bin/env bash
# Prepares TFDS imagenet2012 from the manually downloaded ILSVRC2012 tar files and copies it to a
# gs:// bucket, where TPU workers and GPU hosts read it with --config.data_dir. Meant for a CPU VM
# with ~400 GB of disk in the bucket's region. Run `--help` for usage.
set -euo pipefail

# TFDS's own builder, called directly: the `tfds build` command needs apache_beam just to start.
readonly PREPARE='import sys, tensorflow_datasets as tfds; '\
'tfds.builder("imagenet2012", data_dir=sys.argv[2]).download_and_prepare('\
'download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[1]))'

usage() {
  cat <<'EOF'
Usage: launch/prepare_imagenet.sh --manual-dir DIR --data-dir DIR [--gcs-dir gs://...] [options]

  --manual-dir DIR      directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
  --data-dir DIR        local TFDS data directory to prepare into (~150 GB)
  --gcs-dir URL         gs:// TFDS data directory to copy the prepared dataset into
                        (as URL/imagenet2012/...; train with --config.data_dir=URL)
  --python PYTHON       interpreter with this package installed (default python3)
  --dry-run             print the commands, one per line prefixed with '+ ', instead of running them
  -h, --help            show this help

Example:
  launch/prepare_imagenet.sh --manual-dir ~/ilsvrc --data-dir ~/tensorflow_datasets \
      --gcs-dir gs://BUCKET/tfds
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

main() {
  dry_run=0 manual_dir='' data_dir='' gcs_dir='' python=python3
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --dry-run) dry_run=1; shift ;;
      --manual-dir) take manual_dir "$@"; shift 2 ;;
      --data-dir) take data_dir "$@"; shift 2 ;;
      --gcs-dir) take gcs_dir "$@"; shift 2 ;;
      --python) take python "$@"; shift 2 ;;
      *) die "unexpected argument $1 (see --help)" ;;
    esac
  done
  [[ -n $manual_dir ]] || die '--manual-dir is required'
  local tar
  for tar in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
    [[ -f $manual_dir/$tar ]] || die "$manual_dir/$tar not found; download it from image-net.org"
  done
  [[ -n $data_dir ]] || die '--data-dir is required'
  [[ -z $gcs_dir || $gcs_dir == gs://?* ]] || die "--gcs-dir $gcs_dir is not a gs:// URL"

  run "$python" -c "$PREPARE" "$manual_dir" "$data_dir"
  [[ -z $gcs_dir ]] ||
    run gcloud storage rsync --recursive "${data_dir%/}/imagenet2012" "${gcs_dir%/}/imagenet2012"
}

main "$@"
