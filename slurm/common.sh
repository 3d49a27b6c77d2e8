#!/bin/bash
# The DIVE pipeline shared by slurm/dive_tiny.sh and slurm/dive_70b.sh (sourced; needs their knobs).
# No ssh/pdsh: every multi-node step is one `srun` task per node.

log() { echo "[dive $(date +%H:%M:%S) restart ${SLURM_RESTART_COUNT:-0}] $*"; }

master_addr() {
    # The first node of the allocation, as an address: on clusters whose node names are not DNS names
    # (e.g. a test cluster with NodeAddr=127.0.0.1) use the NodeAddr slurmctld knows.
    local first addr
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    addr="$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
    echo "${addr:-$first}"
}

STEP_PID=""
STEP_STOP_FILE=""
PREEMPTED=0

on_preempt() {
    # USR1 from --signal (time limit near) or from a pre-emption policy.
    PREEMPTED=1
    if [[ -n "$STEP_PID" && -n "$STEP_STOP_FILE" ]]; then
        # Retraining: every rank sees the stop file after its step, the stage checkpoints and the
        # launcher exits. (A signal to the srun step would cancel it at once: slurmstepd kills the tasks,
        # and torchrun gives its workers only 30 s.)
        log "USR1: asking retraining to checkpoint and stop ($STEP_STOP_FILE)"
        touch "$STEP_STOP_FILE"
    elif [[ -n "$STEP_PID" ]]; then
        # Calibration, mining, reconstruction, consolidation: their outputs are written atomically and
        # every step skips complete work, so stopping mid-way loses only that step's progress.
        log "USR1: stopping the running step; the requeued job redoes it"
        kill -TERM "$STEP_PID" 2>/dev/null || true
    else
        log "USR1: between steps; requeueing"
    fi
}

run_step() {
    # run_step STOP_FILE CMD...: run CMD in the background so the USR1 trap can interrupt `wait`.
    # STOP_FILE (may be empty) is touched on USR1 to stop the step gracefully; CMD gets STOP_GRACE
    # seconds to finish after that, then SIGTERM.
    STEP_STOP_FILE="$1"
    shift
    if [[ "$PREEMPTED" == 1 ]]; then
        requeue_now
    fi
    "$@" &
    STEP_PID=$!
    local rc=0
    wait "$STEP_PID" || rc=$?
    if [[ "$PREEMPTED" == 1 ]]; then
        local waited=0
        while kill -0 "$STEP_PID" 2>/dev/null; do
            if (( waited == STOP_GRACE )); then
                log "the step did not stop within STOP_GRACE=${STOP_GRACE}s; sending SIGTERM"
                kill -TERM "$STEP_PID" 2>/dev/null || true
            fi
            sleep 1
            waited=$((waited + 1))
        done
        rc=0
        wait "$STEP_PID" || rc=$?
        log "the step ended (exit $rc)"
        requeue_now
    fi
    STEP_PID=""
    STEP_STOP_FILE=""
    return "$rc"
}

requeue_now() {
    log "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

preflight() {
    # The trainer's own checks of the run config against the DeepSpeed JSON (batch arithmetic, precision,
    # ZeRO stage) and the EP layout, in seconds, before calibration and reconstruction (hours at 70B).
    local world=$((NODES * GPUS_PER_NODE))
    if (( EXPERTS % EP_SIZE || world % EP_SIZE )); then
        echo "EP_SIZE=$EP_SIZE must divide EXPERTS=$EXPERTS and NODES x GPUS_PER_NODE=$world" >&2
        exit 2
    fi
    "$PYTHON" -c 'import json, sys
from dive_ds.train.config import load_run_config
from dive_ds.train.ds_config import resolve_ds_config
cfg, ds, out, ep, world, acc, domains = sys.argv[1:]
try:
    run = load_run_config(cfg, [f"model.path={out}/moe", f"out_dir={out}/retrain", f"parallel.ep_size={ep}"])
    resolve_ds_config(json.load(open(ds)), run, int(world), acc, ds)
except ValueError as e:
    sys.exit(f"preflight: {e}")
if run.data.registry != domains:
    print(f"preflight: note: calibration reads DOMAINS={domains}, retraining data.registry={run.data.registry}")
' "$RUN_CONFIG" "$DS_CONFIG" "$OUT" "$EP_SIZE" "$world" "$DS_ACCELERATOR" "$DOMAINS"
}

step_calibrate() {
    if [[ -f "$CALIB/manifest.json" ]]; then
        log "calibration: reusing $CALIB"
        return
    fi
    log "calibration (once, on $(hostname)) -> $CALIB"
    # shellcheck disable=SC2086  # ONLY is a list of domain names
    run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" calibrate --model "$MODEL" --domains "$DOMAINS" \
        ${ONLY:+--only $ONLY} --samples-per-domain "$SAMPLES" --seq-len "$SEQ_LEN" \
        --eval-windows "${EVAL_WINDOWS:-2}" --no-progress --out "$CALIB"
}

step_mine() {
    if [[ -f "$GROUPS_JSON" ]]; then
        log "groups: reusing $GROUPS_JSON"
        return
    fi
    log "mining (once) -> $OUT/mining"
    run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" mine --calib "$CALIB" --experts "$EXPERTS" \
        ${MINE_FAST:+--fast-only} --out "$OUT/mining"
    GROUPS_JSON="$OUT/mining/groups.json"
}

step_reconstruct() {
    log "reconstruction, one task per node, EP $EP_SIZE -> $OUT/moe"
    run_step "" srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$PYTHON" "$REPO/launchers/reconstruct.py" reconstruct --calib "$CALIB" --groups "$GROUPS_JSON" \
        --experts "$EXPERTS" --top-k "$TOP_K" --prune-ratio "$PRUNE_RATIO" --out "$OUT/moe" \
        --shards --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --ep "$EP_SIZE"
}

step_fit_router() {
    # The routers are fitted from the dense model (dive-ds fit-router) unless ROUTER_INIT=random, the
    # paper's recipe (random router, then the router stage of the run config).
    if [[ "${ROUTER_INIT:-fit}" != fit ]]; then
        MOE_DIR="$OUT/moe"
        log "routers: random init (ROUTER_INIT=$ROUTER_INIT); the run config's router stage trains them"
        return
    fi
    MOE_DIR="$OUT/moe-fitted"
    if [[ -f "$MOE_DIR/router_fit.json" ]]; then
        log "router fitting: reusing $MOE_DIR"
        return
    fi
    log "router fitting (once, on $(hostname)) -> $MOE_DIR"
    run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" fit-router --moe "$OUT/moe" --calib "$CALIB" \
        --no-progress --out "$MOE_DIR"
}

step_retrain() {
    local addr
    addr="$(master_addr)"
    log "retraining on $NODES node(s) x $GPUS_PER_NODE rank(s), EP $EP_SIZE, $DS_CONFIG; rendezvous $addr:$MASTER_PORT"
    log "TensorBoard: tensorboard --logdir $OUT/retrain"
    rm -f "$OUT/retrain/STOP"  # this job's own stop request from before its requeue
    # SLURM_NODEID is the task's own node index: expand it inside the task.
    # shellcheck disable=SC2016
    run_step "$OUT/retrain/STOP" srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
        '"$0" --nnodes="$1" --nproc_per_node="$2" --node_rank="$SLURM_NODEID" --master_addr="$3" \
            --master_port="$4" "$5/launchers/retrain.py" --deepspeed "$6" --config "$7" \
            --set model.path="${10}" --set out_dir="$8/retrain" --set parallel.ep_size="$9"' \
        "$TORCHRUN" "$NODES" "$GPUS_PER_NODE" "$addr" "$MASTER_PORT" "$REPO" "$DS_CONFIG" "$RUN_CONFIG" \
        "$OUT" "$EP_SIZE" "$MOE_DIR"
}

step_consolidate() {
    # The retrained model is sharded by expert (each rank wrote its own experts); this streams it
    # layer by layer into one HF folder, so it never holds the whole model in memory.
    local trained="$OUT/retrain/model"
    if [[ -f "$FINAL/config.json" ]]; then
        log "consolidation: reusing $FINAL"
        return
    fi
    if [[ -f "$trained/dive_shards.json" ]]; then
        log "consolidation: $trained -> $FINAL"
        run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" consolidate --shards "$trained" --out "$FINAL"
    else  # EP_SIZE=1: the stage output is already one HF folder
        log "consolidation: $trained is one HF folder; copying it to $FINAL"
        run_step "" cp -r "$trained" "$FINAL"
    fi
}

dive_main() {
    trap on_preempt USR1
    preflight
    mkdir -p "$OUT"
    log "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: $NODES node(s), out $OUT"
    step_calibrate
    step_mine
    step_reconstruct
    step_fit_router
    step_retrain
    step_consolidate
    log "done: $FINAL"
}
