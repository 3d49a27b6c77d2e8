"""One retraining stage on an initialised process group: prepare the model, build the DeepSpeed
engine (resuming the stage's latest checkpoint), then per step forward, backward, step, log and
checkpoint; at the end the stage's output folder.

1. the input (model.path, or the previous stage's output) is loaded with from_pretrained (under
   `HfDeepSpeedConfig` for ZeRO-3, so each rank materialises its partition of the REAL weights)
   and its parameter statistics are checked;
2. routing and trainables are set (router: dense tempered routing, routers only; experts: sparse
   noisy top-k, expert LoRA + routers + RMSNorms); the trainable fraction is printed;
3. the engine gets the optimizer from the JSON (`torch_adam`) and the stage's lr schedule as a
   LambdaLR;
4. every K steps `save_checkpoint` (model, optimizer, scheduler; plus the data position, step,
   tokens and every rank's python/numpy/torch RNG states), keeping the last M;
5. at the end the full weights are gathered from the live engine (GatheredParameters under
   ZeRO-3), LoRA merged, and a plain HF checkpoint (safetensors) written to OUT/stages/<name>/model.

Data parallelism: every rank reads the whole global batch from the (deterministic) stream and
keeps its micro batches; with `rng_per_micro_batch` the router noise and dropout of micro batch m
depend on (seed, step, m) only, so 1 rank and N ranks see the same randomness.

Legend: G global batch (sequences), S sequence length, V vocabulary, L layers, E experts.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dive_ds.io.atomic import write_json
from dive_ds.models.moe import DiveMoeBlock, DiveMoeForCausalLM, moe_blocks
from dive_ds.parallel.distributed import barrier, current_device
from dive_ds.train import rng
from dive_ds.train.checkpoint import resume_stage, resume_tag, save_if_due, stage_meta
from dive_ds.train.config import RunConfig, StageConfig
from dive_ds.train.data import build_stream
from dive_ds.train.ds_config import stage_ds_config
from dive_ds.train.evaluation import causal_lm_loss, log_eval, summarise_eval
from dive_ds.train.export import gather_state_dict, local_expert_state, write_stage_output
from dive_ds.train.faults import crash_step
from dive_ds.train.metrics import BalanceLoss, StepAccumulator, TopKLoadProbe, TrainLogger, load_cv
from dive_ds.train.model import check_parameter_stats, load_model
from dive_ds.train.planning import StagePlan
from dive_ds.train.schedule import lr_factor
from dive_ds.train.stop import STOP_FILE, Interrupted, StopFlag
from dive_ds.train.trainable import param_groups, prepare_stage_model, trainable_line


def run_stage(
    run: RunConfig,
    plan: StagePlan,
    input_dir: Path,
    ds_base: dict,
    rank: int,
    world: int,
    windows: dict[str, torch.Tensor],
    tokenizer,
    ep_size: int | None = None,
) -> dict:
    from tqdm import tqdm

    stage, steps = plan.stage, plan.steps
    ds = stage_ds_config(ds_base, stage)
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    mbs, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    glob, seq_len = run.train.global_batch_size, run.data.seq_len
    device = current_device()
    plan.dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(plan.dir / "ds_config.json", ds)
    tag = resume_tag(run, plan, rank)

    _seed_all(run.train.seed + plan.index)  # a resumed stage overwrites this with the checkpoint's RNG states
    model, keep_alive, counts = _prepare_model(run, stage, input_dir, ds, zero_stage, rank, ep_size)
    balance = BalanceLoss(model) if stage.aux_loss_coef > 0 else None
    probe = TopKLoadProbe(model) if stage.router_mode == "dense" else None  # dense: load = inference top-k
    engine, scheduler = _build_engine(model, ds, stage, steps, zero_stage, ep_size)
    stats = check_parameter_stats(engine.module, run.model.max_abs_weight)
    module: DiveMoeForCausalLM = engine.module
    blocks = moe_blocks(module)

    stream = build_stream(run.data, tokenizer)
    start, tokens_seen = resume_stage(engine, plan, tag, stream, rank, ep_size) if tag is not None else (0, 0)
    meta = stage_meta(run, stage, input_dir, steps, world, zero_stage, ep_size)
    log = _open_log(run, plan, start, counts, stats, input_dir, world, zero_stage, rank, mbs, gas)

    stop = StopFlag(Path(run.out_dir) / STOP_FILE)
    stop.install()
    crash_at = crash_step(stage.name)
    last_saved = start
    heat_counts = torch.zeros(len(blocks), blocks[0].num_experts, dtype=torch.float64)
    bar = tqdm(
        total=steps,
        initial=start,
        desc=stage.name,
        unit="step",
        dynamic_ncols=True,
        disable=rank != 0 or not run.logging.progress,
        file=sys.stdout,
    )
    engine.train()
    result: dict = {}
    try:
        if start == 0 and run.eval.at_start:
            log_eval(engine, module, windows, run, device, log, plan.step_offset, stage.name, 0)
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            before = (
                (stream.state_dict(), rng.snapshot()) if gas > 1 else None
            )  # a stop between micro batches
            ids_GS, _domains = stream.next_batch(glob)
            mine = ids_GS[rank * gas * mbs : (rank + 1) * gas * mbs]
            acc = StepAccumulator(blocks)
            for i in range(gas):  # forward, backward, step per micro batch (the optimizer steps on the last)
                if i and stop_agreed(stop.set):  # a long step stops within one micro batch, not at its end
                    _stop_mid_step(engine, run, plan, step, tokens_seen, stream, before, last_saved, meta, rank,
                                   input_dir)  # fmt: skip
                if run.train.rng_per_micro_batch:
                    torch.manual_seed(_micro_seed(run.train.seed, plan.index, step, rank * gas + i))
                ids = mine[i * mbs : (i + 1) * mbs].to(device)
                ce, aux, loss = _forward(engine, ids, balance, stage.aux_loss_coef)
                acc.add(ce.item(), aux.item() if aux is not None else 0.0, probe)
                engine.backward(loss)
                engine.step()
            tokens_seen += glob * seq_len
            grad_norm = engine.get_global_grad_norm()
            red = acc.reduce(time.perf_counter() - t0, stop.set)
            step_time = time.perf_counter() - t0
            tok_s = glob * seq_len / step_time
            heat_counts += red["counts_LE"]
            _log_step(log, run, plan, step, red, lr, grad_norm, tokens_seen, tok_s, step_time, rank)
            if run.logging.heatmap_every and step % run.logging.heatmap_every == 0:
                log.heatmap(
                    heat_counts, plan.step_offset + step, f"{stage.name} step {step}: expert load share"
                )
                heat_counts.zero_()
            bar.set_postfix(loss=f"{red['loss']:.4f}", lr=f"{lr:.2g}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            if run.eval.every and step % run.eval.every == 0 and step != steps:
                log_eval(engine, module, windows, run, device, log, plan.step_offset + step, stage.name, step)
            if save_if_due(engine, run, plan, step, tokens_seen, stream, red["stop"], meta, rank, input_dir):
                last_saved = step
            log.flush()
            if crash_at == step:
                bar.close()
                log.close()
                os._exit(3)  # test hook: die like a killed process, no clean-up
            if red["stop"]:
                raise Interrupted(
                    f"stage {stage.name}: stopped after step {step} (a signal or {Path(run.out_dir) / STOP_FILE}); "
                    "checkpoint saved, relaunch the same command to resume"
                )
        bar.close()
        final = (
            summarise_eval(
                log_eval(
                    engine, module, windows, run, device, log, plan.step_offset + steps, stage.name, steps
                )
            )
            if run.eval.at_end
            else None
        )
        log.heatmap(heat_counts, plan.step_offset + steps, f"{stage.name} end: expert load share")
        state = gather_state_dict(module, skip_ep_experts=bool(ep_size))
        local_experts = local_expert_state(module, meta["lora"]) if ep_size else None
        result = {
            "stage": stage.name,
            "steps": steps,
            "tokens_seen": tokens_seen,
            "final_eval": final,
            "trainable": counts,
            "last_checkpoint": f"step_{last_saved:08d}",
        }
    finally:
        bar.close()
        stop.restore()
        for hooks in (balance, probe):
            if hooks is not None:
                hooks.remove()
        log.close()
    del engine, module, model, keep_alive, blocks
    _free_memory()
    write_stage_output(
        run, plan, input_dir, state, local_experts, result, meta, rank, world, zero_stage, ep_size
    )
    barrier()
    return result


# --------------------------------------------------------------------------- set-up


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stop_agreed(local: bool) -> bool:
    """Did any rank get a stop request? (one 1-element all-reduce: every rank leaves the step together)"""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([float(local)], dtype=torch.float64)
    dist.all_reduce(flag)
    return flag.item() > 0


def _stop_mid_step(engine, run, plan, step, tokens_seen, stream, before, last_saved, meta, rank, input_dir):
    """Abandon step `step` part-way (its micro batches so far changed no weight: the optimizer steps on the
    last), checkpoint the last complete step with the data stream and RNGs rewound to where it ended, and
    stop (Interrupted). The relaunch then runs `step` whole, as an uninterrupted run would."""
    data, rngs = before
    stream.load_state_dict(data)
    rng.rewind(rngs)
    done = step - 1
    if done > 0 and last_saved != done:
        save_if_due(engine, run, plan, done, tokens_seen, stream, True, meta, rank, input_dir)
    raise Interrupted(
        f"stage {plan.stage.name}: stopped after step {done}, part-way through step {step} (a signal or "
        f"{Path(run.out_dir) / STOP_FILE}); "
        + ("checkpoint saved, relaunch the same command to resume" if done > 0 else "relaunch to start it")
    )


def _micro_seed(seed: int, stage_index: int, step: int, micro: int) -> int:
    return int(np.random.default_rng([seed, stage_index, step, micro]).integers(0, 2**63 - 1))


def _prepare_model(
    run: RunConfig,
    stage: StageConfig,
    input_dir: Path,
    ds: dict,
    zero_stage: int,
    rank: int,
    ep_size: int | None,
):
    """Load the stage input and set its routing and trainables -> (model, keep-alive, trainable counts)."""
    from deepspeed.utils import set_z3_leaf_modules

    if ep_size:
        from dive_ds.parallel.ep_model import build_ep_model, ensure_ep_groups

        ep_rank, _ = ensure_ep_groups(ep_size)
        model, keep_alive = build_ep_model(input_dir, ep_size, ep_rank), None
    else:
        model, keep_alive = load_model(input_dir, ds, run.model.zero3_init)
    counts = prepare_stage_model(model, stage, run.train.seed)
    if ep_size:
        from dive_ds.parallel.expert_parallel import retag_model

        retag_model(model)  # LoRA tensors of the experts reduce over the expert-data-parallel group too
    if rank == 0:
        print(trainable_line(stage.name, counts), flush=True)
    if not stage.unfreeze_embeddings:
        # Frozen embeddings leave layer 0's inputs without grad; ZeRO-3's module backward hooks then fire
        # (and release the parameters) before the module's own backward ran. Same fix as PEFT's.
        model.enable_input_require_grads()
    if run.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if zero_stage == 3:
        set_z3_leaf_modules(model, [DiveMoeBlock])  # routing changes the expert order: fetch the block whole
    return model, keep_alive, counts


def _build_engine(model, ds: dict, stage: StageConfig, steps: int, zero_stage: int, ep_size: int | None):
    """The DeepSpeed engine (optimizer from the JSON, the stage's lr schedule) -> (engine, scheduler)."""
    import deepspeed

    factor = lr_factor(stage, steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, ep_size, zero_stage),
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        dist_init_required=False,
    )
    return engine, scheduler


def _open_log(
    run: RunConfig, plan: StagePlan, start: int, counts: dict, stats: dict, input_dir: Path, world: int,
    zero_stage: int, rank: int, mbs: int, gas: int,
) -> TrainLogger:  # fmt: skip
    """The stage's logger, its stage_start record, and the stage's one-line plan on rank 0."""
    stage, steps = plan.stage, plan.steps
    glob, seq_len = run.train.global_batch_size, run.data.seq_len
    log = TrainLogger(
        Path(run.out_dir),
        run.logging.tensorboard,
        rank,
        purge_step=plan.step_offset + start + 1 if start else None,
    )
    log.record(
        {
            "event": "stage_start",
            "stage": stage.name,
            "step": start,
            "steps": steps,
            "trainable": counts,
            "param_stats": stats,
            "input": str(Path(input_dir).resolve()),
            "world_size": world,
            "zero_stage": zero_stage,
            "aux_loss_coef": stage.aux_loss_coef,
        }
    )
    if rank == 0:
        print(
            f"[{stage.name}] {steps} steps x {glob} sequences x {seq_len} tokens = {steps * glob * seq_len:,} tokens; "
            f"micro batch {mbs} x grad accumulation {gas} x {world} rank(s); ZeRO-{zero_stage}; "
            f"lr {stage.lr:g} {stage.schedule}",
            flush=True,
        )
    return log


# --------------------------------------------------------------------------- per step


def _forward(engine, ids: torch.Tensor, balance: BalanceLoss | None, aux_coef: float):
    """One micro batch's forward -> (cross-entropy, load-balancing loss or None, the loss to backward)."""
    if balance is not None:
        balance.start()
    logits = engine(input_ids=ids, use_cache=False).logits
    ce = causal_lm_loss(logits, ids)
    loss, aux = ce, None
    if balance is not None:
        aux = balance.loss()
        loss = ce + aux_coef * aux
    return ce, aux, loss


def _log_step(
    log: TrainLogger, run: RunConfig, plan: StagePlan, step: int, red: dict, lr: float, grad_norm,
    tokens_seen: int, tok_s: float, step_time: float, rank: int,
) -> None:  # fmt: skip
    """The step's metrics row; every logging.every steps its scalars (and a line without a progress bar)."""
    stage, steps = plan.stage, plan.steps
    gstep = plan.step_offset + step
    balance = stage.aux_loss_coef > 0
    row = {
        "stage": stage.name,
        "step": step,
        "global_step": gstep,
        "loss": red["loss"],
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tok_s,
        "step_time_s": step_time,
        "load_cv_mean": float(load_cv(red["counts_LE"]).mean()),
    }
    if balance:
        row |= {"aux_loss": red["aux_loss"], "aux_loss_coef": stage.aux_loss_coef}
    log.record(row)
    if step % run.logging.every == 0 or step == steps:
        scalars = {
            "train/loss": red["loss"],
            "train/lr": lr,
            "train/grad_norm": row["grad_norm"],
            "train/tokens_seen": tokens_seen,
            "train/tokens_per_s": tok_s,
            "train/step_time_s": step_time,
        }
        if balance:
            scalars |= {"train/aux_loss": red["aux_loss"], "train/aux_loss_coef": stage.aux_loss_coef}
        log.scalars(scalars, gstep)
        log.moe_scalars(red["counts_LE"], red["entropy_L"], gstep, run.logging.per_expert_scalars)
        if not run.logging.progress and rank == 0:
            print(
                f"[{stage.name}] step {step}/{steps} loss {red['loss']:.4f} lr {lr:.3g} {tok_s:,.0f} tok/s",
                flush=True,
            )


# --------------------------------------------------------------------------- end of the stage


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
