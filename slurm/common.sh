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
        # Calibration and retraining: every rank sees the stop file at its next layer boundary (calibration)
        # or after its step (retraining), checkpoints and exits. (A signal to the srun step would cancel
        # it at once: slurmstepd kills the tasks, and torchrun gives its workers only 30 s.)
        log "USR1: asking the step to checkpoint and stop ($STEP_STOP_FILE)"
        touch "$STEP_STOP_FILE"
    elif [[ -n "$STEP_PID" ]]; then
        # Mining, reconstruction, router fitting, consolidation: their outputs are written atomically and
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
    # seconds to finish after that, then SIGTERM, and the job requeues: the relaunched step resumes from
    # the checkpoint the stop wrote (calibration exits 3 after it, retraining 143; torchrun reports
    # either as 1, so the exit status is not what tells a stop from a failure).
    STEP_STOP_FILE="$1"
    shift
    if [[ "$PREEMPTED" == 1 ]]; then
        requeue_now
    fi
    if [[ -n "$STEP_STOP_FILE" ]]; then
        rm -f "$STEP_STOP_FILE"  # this job's own stop request from before its requeue
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
    if [[ -n "$STEP_STOP_FILE" && -f "$STEP_STOP_FILE" ]] && (( rc != 0 )); then
        # touched by hand, not by the trap: stop the job; resubmitting the same job resumes
        log "the step stopped on request ($STEP_STOP_FILE, exit $rc); resubmit to resume from its checkpoint"
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
from dive_ds.train.config_load import load_run_config
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

srun_torchrun() {
    # srun_torchrun STOP_FILE PORT SCRIPT ARG...: run_step of one srun task per node, each starting that
    # node's GPUS_PER_NODE ranks of SCRIPT with torchrun (static rendezvous on the first node at PORT;
    # every rank gets RANK / WORLD_SIZE / LOCAL_RANK and MASTER_ADDR / MASTER_PORT for env://).
    local stop="$1" port="$2" addr
    shift 2
    addr="$(master_addr)"
    log "  $NODES srun task(s) x torchrun $GPUS_PER_NODE rank(s) of $(basename "$1"); rendezvous $addr:$port"
    # SLURM_NODEID is the task's own node index: expand it inside the task.
    # shellcheck disable=SC2016
    run_step "$stop" srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
        'exec "$0" --nnodes="$1" --nproc_per_node="$2" --node_rank="$SLURM_NODEID" --master_addr="$3" \
            --master_port="$4" "${@:5}"' \
        "$TORCHRUN" "$NODES" "$GPUS_PER_NODE" "$addr" "$port" "$@"
}

step_calibrate() {
    if [[ -f "$CALIB/manifest.json" ]]; then
        log "calibration: reusing $CALIB"
        return
    fi
    log "calibration on $NODES node(s) x $GPUS_PER_NODE rank(s), $CALIB_DEVICE $CALIB_DTYPE -> $CALIB"
    # Resumable: checkpoints every CALIB_CKPT_EVERY layers; on USR1 the trap touches the stop file, the
    # pass checkpoints at the next layer boundary, and the requeued job's identical command resumes.
    # shellcheck disable=SC2086  # ONLY is a list of domain names
    srun_torchrun "$OUT/calib.stop" "$((MASTER_PORT + 1))" "$REPO/launchers/reconstruct.py" calibrate \
        --model "$MODEL" --domains "$DOMAINS" ${ONLY:+--only $ONLY} --samples-per-domain "$SAMPLES" \
        --seq-len "$SEQ_LEN" --eval-windows "${EVAL_WINDOWS:-2}" --device "$CALIB_DEVICE" --dtype "$CALIB_DTYPE" \
        --checkpoint-dir "$OUT/calib-ckpt" --checkpoint-every "${CALIB_CKPT_EVERY:-4}" \
        --stop-file "$OUT/calib.stop" --no-progress --out "$CALIB"
}

step_mine() {
    if [[ -f "$GROUPS_JSON" ]]; then
        log "groups: reusing $GROUPS_JSON"
        return
    fi
    if [[ -n "${MINE_FAST:-}" ]]; then  # statistics only: seconds on one process
        log "mining (fast affinity, once) -> $OUT/mining"
        run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" mine --calib "$CALIB" --experts "$EXPERTS" \
            --prune-ratio "$PRUNE_RATIO" --fast-only --out "$OUT/mining"
    else  # the D x D pruned evaluations, streamed layer by layer on every rank (the dense model read once)
        log "mining on $NODES node(s) x $GPUS_PER_NODE rank(s) -> $OUT/mining"
        srun_torchrun "" "$((MASTER_PORT + 4))" "$REPO/launchers/reconstruct.py" mine --calib "$CALIB" \
            --experts "$EXPERTS" --prune-ratio "$PRUNE_RATIO" ${MINE_WINDOWS:+--eval-windows "$MINE_WINDOWS"} \
            --device "$CALIB_DEVICE" \
            --dtype "$CALIB_DTYPE" --out "$OUT/mining"
    fi
    GROUPS_JSON="$OUT/mining/groups.json"
}

step_reconstruct() {
    if [[ -n "${MOE:-}" ]]; then
        log "reconstruction and router fitting: using $MOE"
        return
    fi
    log "reconstruction, one task per node, EP $EP_SIZE -> $OUT/moe"
    run_step "" srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$PYTHON" "$REPO/launchers/reconstruct.py" reconstruct --calib "$CALIB" --groups "$GROUPS_JSON" \
        --experts "$EXPERTS" --top-k "$TOP_K" --prune-ratio "$PRUNE_RATIO" --out "$OUT/moe" \
        --shards --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --ep "$EP_SIZE"
}

step_fit_router() {
    # The routers are fitted from the dense model (dive-ds fit-router) unless ROUTER_INIT=random, the
    # paper's recipe (random router, then the router stage of the run config).
    if [[ -n "${MOE:-}" ]]; then
        MOE_DIR="$MOE"
        return
    fi
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
    log "router fitting on $NODES node(s) x $GPUS_PER_NODE rank(s), $CALIB_DEVICE $CALIB_DTYPE -> $MOE_DIR"
    srun_torchrun "" "$((MASTER_PORT + 2))" "$REPO/launchers/reconstruct.py" fit-router --moe "$OUT/moe" \
        --calib "$CALIB" --device "$CALIB_DEVICE" --dtype "$CALIB_DTYPE" \
        ${FIT_WINDOWS:+--fit-windows "$FIT_WINDOWS"} --no-progress --out "$MOE_DIR"
}

step_retrain() {
    log "retraining on $NODES node(s) x $GPUS_PER_NODE rank(s), EP $EP_SIZE, $DS_CONFIG; rendezvous port $MASTER_PORT"
    log "TensorBoard: tensorboard --logdir $OUT/retrain"
    srun_torchrun "$OUT/retrain/STOP" "$MASTER_PORT" "$REPO/launchers/retrain.py" --deepspeed "$DS_CONFIG" \
        --config "$RUN_CONFIG" --set model.path="$MOE_DIR" --set out_dir="$OUT/retrain" \
        --set parallel.ep_size="$EP_SIZE"
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

step_evaluate() {
    # Perplexity of the retrained model, streamed: every rank its share of the windows, one decoder layer
    # resident (no rank holds the whole MoE). On the calibration's held-out windows (EVALUATE=1; mining chose
    # the groups on them: a check of the run, not a clean score) and, with EVAL_DOMAINS, on a registry's
    # evaluation split (never calibrated, selected or trained on); EVAL_TASKS: lm-eval tasks, on one process
    # that loads the whole model. Each output is reused when complete, so a requeue runs only what is missing.
    [[ "${EVALUATE:-1}" == 1 ]] || { log "evaluation: skipped (EVALUATE=${EVALUATE:-})"; return; }
    if [[ -f "$OUT/eval/eval.json" ]]; then
        log "evaluation: reusing $OUT/eval"
    else
        log "evaluation of $FINAL on $NODES node(s) x $GPUS_PER_NODE rank(s) -> $OUT/eval"
        srun_torchrun "" "$((MASTER_PORT + 3))" "$REPO/launchers/reconstruct.py" evaluate "$FINAL" \
            --calib "$CALIB" --device "$CALIB_DEVICE" --dtype "$CALIB_DTYPE" --out "$OUT/eval"
    fi
    if [[ -n "${EVAL_DOMAINS:-}" && ! -f "$OUT/eval-domains/eval.json" ]]; then
        log "evaluation on $EVAL_DOMAINS's evaluation split -> $OUT/eval-domains"
        srun_torchrun "" "$((MASTER_PORT + 5))" "$REPO/launchers/reconstruct.py" evaluate "$FINAL" \
            --domains "$EVAL_DOMAINS" --seq-len "$SEQ_LEN" --device "$CALIB_DEVICE" --dtype "$CALIB_DTYPE" \
            --out "$OUT/eval-domains"
    fi
    if [[ -n "${EVAL_TASKS:-}" && ! -f "$OUT/eval-tasks/eval.json" ]]; then
        log "lm-eval tasks $EVAL_TASKS (one process, the whole model) -> $OUT/eval-tasks"
        run_step "" "$PYTHON" "$REPO/launchers/reconstruct.py" evaluate "$FINAL" --tasks "$EVAL_TASKS" \
            --device "$CALIB_DEVICE" --dtype "$CALIB_DTYPE" --out "$OUT/eval-tasks"
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
    step_evaluate
    log "done: $FINAL"
}
