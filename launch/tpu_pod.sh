#!/usr/bin/env bash
# Run training on every worker of a Cloud TPU VM (pod slice) at the same time, over
# `gcloud compute tpus tpu-vm ssh --worker=all`. On TPU VMs jax.distributed.initialize() finds
# the coordinator, process count and process id by itself; --multiprocess makes main.py call it.
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/vitb16_roi.py \
#   WORKDIR=gs://my-bucket/runs/vitb16 bash launch/tpu_pod.sh [extra flags, e.g. --config.seed=1]
#
# Required environment:
#   TPU_NAME   name of the TPU VM / pod slice
#   ZONE       its zone
#   CONFIG     config file[:args], relative to REPO_DIR on the workers
#   WORKDIR    run directory that every worker can reach: a gs:// path or a shared filesystem.
#              A directory local to each VM does not work: checkpoints are written
#              collectively and process 0 alone writes the metrics.
# Optional environment:
#   PROJECT    GCP project (default: gcloud's configured project)
#   REPO_DIR   checkout of this repository on every worker (default: this repository's path
#              here, so the workers need a checkout at the same path; ~/... is expanded there)
#   PYTHON     interpreter on the workers, e.g. ~/venv/bin/python (default python3)
#   INSTALL    1: run `pip install -e .` plus the matching jax[tpu] in REPO_DIR before training
#              (default 0)
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM / pod slice name)}"
: "${ZONE:?set ZONE (the TPU zone)}"
: "${CONFIG:?set CONFIG (config file, relative to REPO_DIR on the workers)}"
: "${WORKDIR:?set WORKDIR (a gs:// path or a shared filesystem path)}"
PROJECT=${PROJECT:-}
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python3}
INSTALL=${INSTALL:-0}

case $WORKDIR in
  gs://* | /*) ;;
  *) echo "warning: WORKDIR=$WORKDIR is neither gs:// nor absolute; every worker must reach it" >&2 ;;
esac

# Quote a word for the remote shell; a leading ~/ stays expandable there.
remote_quote() {
  # shellcheck disable=SC2088,SC2016  # a literal ~/ and $HOME, expanded on the worker
  case $1 in
    "~/"*) printf '"$HOME"/%q' "${1#\~/}" ;;
    *) printf '%q' "$1" ;;
  esac
}

repo_q=$(remote_quote "$REPO_DIR")
python_q=$(remote_quote "$PYTHON")
args_q=""
for arg in "$@"; do
  args_q+=" $(printf '%q' "$arg")"
done

remote="cd $repo_q"
if [[ $INSTALL == 1 ]]; then
  # pyproject.toml pins jax; jax[tpu] adds libtpu for the same jax version.
  remote+=" && $python_q -m pip install -e ."
  remote+=" && $python_q -m pip install \"jax[tpu]==\$($python_q -c 'import jax; print(jax.__version__)')\""
fi
remote+=" && exec $python_q -m region_medclip.main"
remote+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") --multiprocess$args_q"

gcloud_args=(compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [[ -n $PROJECT ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

echo "on all workers of $TPU_NAME: $remote" >&2
exec gcloud "${gcloud_args[@]}" --command="$remote"
