#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, owning all of that node's GPUs.
# jax.distributed.initialize() (called by main.py with --multiprocess) reads the coordinator,
# process count and process id from SLURM's environment.
#
# Usage (submit from the repository root; #SBATCH values can be overridden on the command line):
#   CONFIG=configs/vitb16_roi.py WORKDIR=/shared/runs/vitb16 \
#     sbatch --nodes=4 launch/gpu_slurm.sh [extra flags, e.g. --config.seed=1]
#
# Required environment (sbatch passes the submitting shell's environment by default):
#   CONFIG     config file[:args], relative to REPO_DIR
#   WORKDIR    run directory on a filesystem shared by all nodes
# Optional environment:
#   REPO_DIR   checkout of this repository (default: the directory sbatch was run from)
#   PYTHON     interpreter (default python)
#
#SBATCH --job-name=region-medclip
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
# SIGTERM to the training processes 120 s before the time limit: they save a checkpoint and
# exit 0; resubmitting with the same WORKDIR resumes.
#SBATCH --signal=TERM@120
set -euo pipefail

: "${CONFIG:?set CONFIG (config file, relative to REPO_DIR)}"
: "${WORKDIR:?set WORKDIR (a directory on a filesystem shared by all nodes)}"
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
cd "$REPO_DIR"

# JAX's SLURM detection restricts each process to the GPU numbered SLURM_LOCALID (it assumes
# one process per GPU). With one process per node, list all local GPUs instead.
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))
export JAX_LOCAL_DEVICE_IDS

# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05) unless told.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# XLA_PYTHON_CLIENT_MEM_FRACTION is left at JAX's default (75% of each GPU's memory is
# preallocated). Optional NCCL knobs, if the interconnect needs them:
#   export NCCL_DEBUG=INFO               # log the transport NCCL picks (IB, sockets, ...)
#   export NCCL_SOCKET_IFNAME=ib0        # network interface for bootstrap / socket transport
#   export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
#   export NCCL_IB_DISABLE=1             # no InfiniBand: fall back to TCP sockets

echo "job ${SLURM_JOB_ID:-?}: ${SLURM_JOB_NUM_NODES:-?} nodes x $gpus_per_node GPUs," \
  "config $CONFIG, workdir $WORKDIR" >&2
srun "$PYTHON" -m region_medclip.main \
  --config="$CONFIG" \
  --workdir="$WORKDIR" \
  --multiprocess \
  "$@"
