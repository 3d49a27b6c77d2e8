#!/bin/bash
# DIVE end to end on the demo model (SmolLM2-135M) on CPU nodes: the same code path as
# slurm/dive_70b.sh, sized for a laptop-class 2-node test cluster.
#
#   sbatch slurm/dive_tiny.sh                       # defaults below
#   NODES=2 EP_SIZE=2 OUT=runs/tiny sbatch --nodes=2 slurm/dive_tiny.sh
#
# Pipeline: calibrate (once; every rank of every node, checkpointed) -> mine (once) -> reconstruct
# (one task per node, each node writes only its experts' shards) -> fit the routers (once, every rank;
# ROUTER_INIT=random skips it) -> retrain router + experts stages -> consolidate (one HF folder).
# Multi-rank steps are one srun task per node starting that node's ranks with torchrun (rendezvous on
# the first node).
# Every step skips work that is already complete, so a requeued job continues where it stopped.
# Pre-emption: SLURM sends USR1 (--signal); during retraining the trap touches OUT/retrain/STOP (every
# rank finishes its step, the stage checkpoints and the trainer exits), during calibration
# OUT/calib.stop (the pass checkpoints at its next layer boundary and exits 3); any other step is
# stopped; then the job requeues itself and resumes from that checkpoint.
#
#SBATCH --job-name=dive-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=dive-tiny-%j.out

set -euo pipefail

# ---- knobs (environment variables, with defaults) ---------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
TORCHRUN="${TORCHRUN:-$(dirname "$PYTHON")/torchrun}"
NODES="${NODES:-${SLURM_NNODES:-2}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"           # ranks per node (CPU processes here)
EP_SIZE="${EP_SIZE:-2}"                       # expert-parallel size; divides EXPERTS and NODES x GPUS_PER_NODE
DS_CONFIG="${DS_CONFIG:-$REPO/ds_configs/zero3.json}"
RUN_CONFIG="${RUN_CONFIG:-$REPO/configs/slurm_tiny.yaml}"
MODEL="${MODEL:-demo}"
DOMAINS="${DOMAINS:-demo}"
ONLY="${ONLY:-wiki_evals code_stdlib}"        # domains used from the registry (space separated)
EXPERTS="${EXPERTS:-2}"
TOP_K="${TOP_K:-1}"
PRUNE_RATIO="${PRUNE_RATIO:-0.5}"
ROUTER_INIT="${ROUTER_INIT:-fit}"             # fit: routers fitted from the dense model; random: the paper's init
SAMPLES="${SAMPLES:-4}"                       # calibration windows per domain
SEQ_LEN="${SEQ_LEN:-64}"
CALIB_DEVICE="${CALIB_DEVICE:-cpu}"            # calibration and router fit: auto, cpu or cuda
CALIB_DTYPE="${CALIB_DTYPE:-fp32}"             # their compute precision (bf16: a GPU or a native-bf16 CPU)
CALIB_CKPT_EVERY="${CALIB_CKPT_EVERY:-4}"      # calibration checkpoints every this many layers
OUT="${OUT:-$REPO/runs/slurm-tiny}"
CALIB="${CALIB:-$OUT/calib}"                  # provide an existing calibration to skip that step
GROUPS_JSON="${GROUPS_JSON:-$OUT/mining/groups.json}"  # provide groups to skip mining
MOE="${MOE:-}"                                 # provide a reconstructed (and fitted) MoE to skip both steps
MINE_FAST="${MINE_FAST:-}"                    # 1: mine the fast affinity only (no D x D pruned evaluations)
FINAL="${FINAL:-$OUT/final}"
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
STOP_GRACE="${STOP_GRACE:-50}"                # s for retraining to checkpoint after USR1 (< the @60 of --signal)

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

dive_main
