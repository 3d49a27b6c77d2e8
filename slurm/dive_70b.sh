#!/bin/bash
# DIVE for a Llama-70B-class model on several 8-GPU nodes: `sbatch slurm/dive_70b.sh`.
# The same pipeline and code as slurm/dive_tiny.sh (which the tests run on a local 2-node cluster).
#
# Defaults, chosen with `dive-ds plan` (README, "Scaling up"):
#   dive-ds plan --model llama2-70b --experts 8 --top-k 1 --prune-ratio 0.5 \
#                --nodes 4 --gpus-per-node 8 --ep 8 --zero 3 --gpu-mem 80
#   -> 238.1B total / 40.8B activated parameters, 18.0 GB per GPU with ZeRO-3 + EP 8 (fits 80 GB);
#      ZeRO-2 would need 83.7 GB per GPU (does not fit 80 GB, fits 141 GB).
# Reference settings of the paper: N=8, k=1, r=0.5 (1of8) or N=8, k=2, r=0.75 (2of8: TOP_K=2 PRUNE_RATIO=0.75).
#
# Override anything with environment variables, e.g.
#   NODES=8 MODEL=/shared/llama-3-70b DOMAINS=/shared/slimpajama.yaml OUT=/shared/runs/dive70b \
#     sbatch --nodes=8 slurm/dive_70b.sh
#
#SBATCH --job-name=dive-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=dive-70b-%j.out

set -euo pipefail

# ---- knobs (environment variables, with defaults) ---------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
TORCHRUN="${TORCHRUN:-$(dirname "$PYTHON")/torchrun}"
NODES="${NODES:-${SLURM_NNODES:-4}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
EP_SIZE="${EP_SIZE:-8}"                        # experts of a layer spread over the 8 GPUs of a node
DS_CONFIG="${DS_CONFIG:-}"                     # empty: ds_configs/zero3.json with bf16 on (see below)
RUN_CONFIG="${RUN_CONFIG:-$REPO/configs/dive_70b.yaml}"
MODEL="${MODEL:-/shared/models/Llama-2-70b-hf}"   # a local Hugging Face folder (no hub download on compute nodes)
DOMAINS="${DOMAINS:-/shared/data/slimpajama_domains.yaml}"  # calibration's domain registry: SlimPajama's 7 sources,
                                               # or yours; retraining reads data.registry of RUN_CONFIG (keep equal)
ONLY="${ONLY:-}"
EXPERTS="${EXPERTS:-8}"
TOP_K="${TOP_K:-1}"
PRUNE_RATIO="${PRUNE_RATIO:-0.5}"
ROUTER_INIT="${ROUTER_INIT:-fit}"             # fit: routers fitted from the dense model; random: the paper's init
SAMPLES="${SAMPLES:-1024}"                     # calibration windows per domain (the paper's setting)
SEQ_LEN="${SEQ_LEN:-1024}"
EVAL_WINDOWS="${EVAL_WINDOWS:-16}"
CALIB_DEVICE="${CALIB_DEVICE:-auto}"           # calibration and router fit on every GPU of the allocation
CALIB_DTYPE="${CALIB_DTYPE:-bf16}"             # (plan: ~80 s of calibration FLOPs on 32 GPUs; see README)
FIT_WINDOWS="${FIT_WINDOWS:-}"                 # router fit: calibration windows per domain (empty: all of them; each
                                               # rank holds only its own: 7 x 1024 x 1024 / 32 tokens x (3H + E) fp32
                                               # = 22.5 GB, on its GPU when there is room)
CALIB_CKPT_EVERY="${CALIB_CKPT_EVERY:-4}"      # calibration checkpoints every 4 of the 80 layers
OUT="${OUT:-/shared/runs/dive-70b}"            # on a file system every node sees
CALIB="${CALIB:-$OUT/calib}"
GROUPS_JSON="${GROUPS_JSON:-$OUT/mining/groups.json}"
MOE="${MOE:-}"                                 # provide a reconstructed (and fitted) MoE to skip both steps
FINAL="${FINAL:-$OUT/final}"
EVALUATE="${EVALUATE:-1}"                     # evaluate the retrained model, streamed on every rank (one layer
                                               # resident per rank); EVAL_DOMAINS: a registry of unseen domains
MINE_FAST="${MINE_FAST:-}"                     # empty: the paper's D x D pruned evaluations, streamed on every rank
MINE_WINDOWS="${MINE_WINDOWS:-4}"              # selection windows per domain for them (D x D x 4 x SEQ_LEN tokens)
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
STOP_GRACE="${STOP_GRACE:-540}"               # s for retraining to finish its step + checkpoint after USR1 (@600)

# ---- NCCL and runtime ----------------------------------------------------------------------------
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
if [[ -n "${NCCL_IB_DISABLE:-}" ]]; then export NCCL_IB_DISABLE; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Slurm 22.05+ srun no longer reads SLURM_CPUS_PER_TASK: without this each step's one task (torchrun and
# its 8 ranks) could be confined to a single CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# configs/dive_70b.yaml trains in bf16 and the trainer refuses a DeepSpeed JSON that disagrees;
# ds_configs/zero3.json is the fp32 CPU-tested file, so the default is that file with bf16 on,
# written into the run folder (a given DS_CONFIG is used as it is).
if [[ -z "$DS_CONFIG" ]]; then
    DS_CONFIG="$OUT/ds_zero3_bf16.json"
    mkdir -p "$OUT"
    "$PYTHON" -c 'import json, sys; ds = json.load(open(sys.argv[1])); ds["bf16"] = {"enabled": True}
json.dump(ds, open(sys.argv[2], "w"), indent=2)' "$REPO/ds_configs/zero3.json" "$DS_CONFIG"
fi

# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

dive_main
