"""Run by tests/test_expert_parallel.py under `torchrun --nproc_per_node 2`: the expert-parallel DIVE
block (ep_size 2) against the single-rank block with all experts, outputs and gradients in fp32.

Every rank builds the same full block (same seed) and the same inputs for both ranks; rank r feeds
its own tokens to its DiveEPMoeBlock. The reference runs the full block on all ranks' tokens at once.
Writes one JSON line of max abs differences per case to $OUT/rank{r}.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dive_ds.models.lora import add_expert_lora  # noqa: E402
from dive_ds.models.moe import DiveMoeBlock, DiveMoeConfig  # noqa: E402
from dive_ds.parallel.expert_parallel import ep_block_from  # noqa: E402


def config(top_k: int, mode: str) -> DiveMoeConfig:
    return DiveMoeConfig(
        vocab_size=11, hidden_size=16, intermediate_size=24, expert_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts_per_tok=top_k, router_mode=mode, router_temperature=0.5,
        router_noise=False,
    )  # fmt: skip


def run_case(
    name: str, top_k: int, mode: str, lora: bool, impl: str, tokens: list[int], rank: int, world: int
):
    import deepspeed.comm as dist

    cfg = config(top_k, mode)
    torch.manual_seed(0)
    full = DiveMoeBlock(cfg)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
        # expert 3 never wins: every token has x[:, 0] >= 2 and expert 3's logit is -50 * x[:, 0]
        full.gate.weight[3] = 0
        full.gate.weight[3, 0] = -50.0
    full.experts.impl = impl
    ep = ep_block_from(full, cfg, world, rank)
    if lora:
        add_expert_lora(full, r=2, alpha=4, dropout=0.0, seed=5)
        add_expert_lora(ep, r=2, alpha=4, dropout=0.0, seed=5)
        with torch.no_grad():  # B starts at zero; give it values so the adapters matter
            for blk in (full, ep):
                g = torch.Generator().manual_seed(9)
                for n in ("lora_gate_up_B", "lora_down_B"):
                    p = getattr(blk.experts, n)
                    full_shape = (cfg.num_local_experts, *p.shape[1:])
                    p.copy_(torch.randn(full_shape, generator=g)[blk.experts.expert_ids])
        ep.experts.impl = impl
    ep.set_deepspeed_parallelism()  # as the DeepSpeed engine does: creates/binds the ep_size_2 group
    assert dist.get_world_size(group=ep.ep_group) == world

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, t, 16, generator=g) for t in tokens]
    for x in xs:
        x[..., 0] = x[..., 0].abs() + 2.0
    gys = [torch.randn(1, t, 16, generator=g) for t in tokens]

    x_ref = torch.cat(xs, dim=1).requires_grad_()
    y_ref = full(x_ref)
    (y_ref * torch.cat(gys, dim=1)).sum().backward()
    counts_ref = full.last_expert_counts

    x_mine = xs[rank].clone().requires_grad_()
    y_mine = ep(x_mine)
    (y_mine * gys[rank]).sum().backward()

    lo = sum(tokens[:rank])
    diffs = {
        "y": (y_mine - y_ref[:, lo : lo + tokens[rank]]).abs().max().item(),
        "dx": (x_mine.grad - x_ref.grad[:, lo : lo + tokens[rank]]).abs().max().item(),
    }
    ids = torch.tensor(ep.experts.expert_ids)
    for n, p in ep.experts.named_parameters():
        diffs["d_" + n] = (p.grad - getattr(full.experts, n).grad[ids]).abs().max().item()
    for n, p in ep.gate.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=ep.ep_group)  # the data-parallel reduction of a replicated router
        diffs["d_gate." + n] = (grad - getattr(full.gate, n).grad).abs().max().item()
    total = ep.last_expert_counts.clone()
    dist.all_reduce(total, group=ep.ep_group)
    return {
        "case": name,
        "diffs": diffs,
        "counts_ref": counts_ref.tolist(),
        "counts_ep": total.tolist(),
        "y_absmax": y_ref.abs().max().item(),
        "local_experts": ep.experts.expert_ids,
    }


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(os.environ["OUT"])
    cases = [
        ("top1", 1, "sparse", False, "loop", [7, 5]),
        ("top2", 2, "sparse", False, "loop", [6, 9]),
        ("top2_grouped_mm", 2, "sparse", False, "auto", [6, 9]),
        ("top1_one_token", 1, "sparse", False, "loop", [1, 8]),
        ("dense_router_stage", 4, "dense", False, "loop", [5, 4]),
        ("top2_lora", 2, "sparse", True, "loop", [8, 3]),
    ]
    with open(out / f"rank{rank}.jsonl", "w") as f:
        for case in cases:
            f.write(json.dumps(run_case(*case, rank=rank, world=world)) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
