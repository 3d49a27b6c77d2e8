"""The loss and the held-out evaluation (per domain, sharded over ranks, inference routing)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dive_ds.models.moe import DiveMoeForCausalLM, moe_blocks
from dive_ds.train.config import RunConfig
from dive_ds.train.data import heldout_windows, resolve_domains
from dive_ds.train.metrics import TrainLogger


def causal_lm_loss(logits_BSV: torch.Tensor, ids_BS: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a packed batch (every position but the last predicts the next token)."""
    logits = logits_BSV[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids_BS[:, 1:].reshape(-1), reduction=reduction
    )


@contextlib.contextmanager
def _sparse_eval(module: DiveMoeForCausalLM):
    """Eval mode with inference routing (sparse top-k, no noise); the training setup comes back after."""
    blocks = moe_blocks(module)
    saved = [(b.gate.mode, b.gate.temperature) for b in blocks]
    saved_cfg = (module.config.router_mode, module.config.router_temperature)
    was_training = module.training
    module.eval()
    for b in blocks:
        b.gate.mode = "sparse"
    try:
        yield
    finally:
        for b, (mode, temp) in zip(blocks, saved):
            b.gate.mode, b.gate.temperature = mode, temp
        module.config.router_mode, module.config.router_temperature = saved_cfg
        module.train(was_training)


@torch.no_grad()
def evaluate(
    forward, windows: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> dict[str, dict]:
    """Held-out NLL per domain, windows sharded over ranks -> {domain: {loss, ppl, tokens}}.

    Every rank runs the same number of forwards (ZeRO-3 gathers are collective): a rank short of
    batches repeats one and ignores its result.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    sums = torch.zeros(len(windows), 2, dtype=torch.float64)
    for d, w in enumerate(windows.values()):
        batches = [w[i : i + batch_size] for i in range(0, w.shape[0], batch_size)]
        for j in range(math.ceil(len(batches) / world)):
            b = j * world + rank
            ids = batches[b if b < len(batches) else 0].to(device)
            nll = causal_lm_loss(forward(ids), ids, reduction="sum")
            if b < len(batches):
                sums[d, 0] += nll.item()
                sums[d, 1] += ids[:, 1:].numel()
    if dist.is_initialized():
        dist.all_reduce(sums)
    out = {}
    for (name, _), (nll, n) in zip(windows.items(), sums.tolist()):
        out[name] = {"loss": nll / n, "ppl": math.exp(min(nll / n, 50.0)), "tokens": int(n)}
    return out


def eval_windows(run: RunConfig, tokenizer, model_vocab: int) -> dict[str, torch.Tensor]:
    """{domain: [n, S] token windows}: from eval.calib_dir, else spread over the training domains'
    evaluation sets (data.split)."""
    e = run.eval
    if e.calib_dir:
        from dive_ds.io.calibration import load_calibration

        cal = load_calibration(e.calib_dir)
        windows = {n: w[: e.windows_per_domain] for n, w in cal.eval.items()}
    else:
        domains, _ = resolve_domains(run.data)
        seq_len = e.seq_len or run.data.seq_len
        windows = {
            d.name: heldout_windows(d, tokenizer, seq_len, e.windows_per_domain, run.data.split)
            for d in domains
        }
        windows = {n: w for n, w in windows.items() if w.shape[0] > 0}
        if not windows:
            raise ValueError(
                "no evaluation windows: every domain's evaluation set is shorter than one window; "
                "lower eval.seq_len, raise data.split.eval or set eval.calib_dir"
            )
    top = max(int(w.max()) for w in windows.values())
    if top >= model_vocab:
        raise ValueError(
            f"evaluation windows hold token id {top} >= the model's vocab_size {model_vocab}: they were "
            "made with another tokenizer"
        )
    return windows


def summarise_eval(result: dict[str, dict]) -> dict:
    tokens = sum(r["tokens"] for r in result.values())
    loss = sum(r["loss"] * r["tokens"] for r in result.values()) / max(tokens, 1)
    return {
        "loss": loss,
        "ppl_mean": float(np.mean([r["ppl"] for r in result.values()])),
        "ppl": {n: r["ppl"] for n, r in result.items()},
        "loss_by_domain": {n: r["loss"] for n, r in result.items()},
    }


def log_eval(
    engine, module, windows, run: RunConfig, device, log: TrainLogger, gstep: int, stage: str, step: int
) -> dict:
    with _sparse_eval(module):
        result = evaluate(
            lambda ids: engine(input_ids=ids, use_cache=False).logits, windows, run.eval.batch_size, device
        )
    summary = summarise_eval(result)
    scalars = {f"eval/ppl/{n}": p for n, p in summary["ppl"].items()}
    scalars |= {"eval/loss": summary["loss"], "eval/ppl_mean": summary["ppl_mean"]}
    log.scalars(scalars, gstep)
    log.record({"event": "eval", "stage": stage, "step": step, "global_step": gstep} | summary)
    return result
