"""Training metrics: per-step accumulation over micro batches, one cross-rank reduction, TensorBoard.

Legend: L MoE layers, E experts per layer, T tokens, K experts per token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dive_ds.models.moe import DiveMoeBlock, DiveRouter, moe_blocks


class StepAccumulator:
    """Sums over one optimizer step's micro batches on this rank (reduced across ranks by `reduce`)."""

    def __init__(self, blocks: list[DiveMoeBlock]):
        self.blocks = blocks
        n_layers, n_experts = len(blocks), blocks[0].num_experts
        self.loss_sum = 0.0
        self.aux_sum = 0.0
        self.micro = 0
        self.counts_LE = torch.zeros(n_layers, n_experts, dtype=torch.float64)
        self.entropy_L = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, loss: float, aux: float, probe: TopKLoadProbe | None = None) -> None:
        """Call right after a micro batch's forward (the blocks hold that forward's routing).

        With a probe (dense routing, where every expert gets every token), the load counted is the
        top-k choice of the clean logits, i.e. the routing the model would do at inference.
        """
        self.loss_sum += loss
        self.aux_sum += aux
        self.micro += 1
        for i, block in enumerate(self.blocks):
            counts = probe.counts[i] if probe is not None else block.last_expert_counts
            if counts is not None:
                self.counts_LE[i] += counts.detach().to("cpu", torch.float64)
            if block.last_router_entropy is not None:
                self.entropy_L[i] += float(block.last_router_entropy)

    def reduce(self, step_time: float, stop: bool, group=None) -> dict:
        """One all-reduce (sum) over ranks -> means and summed counts."""
        n_layers, n_experts = self.counts_LE.shape
        flat = torch.cat(
            [
                torch.tensor(
                    [self.loss_sum, self.aux_sum, float(self.micro), step_time, float(stop)],
                    dtype=torch.float64,
                ),
                self.entropy_L,
                self.counts_LE.flatten(),
            ]
        )
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, group=group)
            world = dist.get_world_size(group)
        micro = max(flat[2].item(), 1.0)
        return {
            "loss": flat[0].item() / micro,
            "aux_loss": flat[1].item() / micro,
            "step_time_s": flat[3].item() / world,
            "stop": flat[4].item() > 0,
            "entropy_L": flat[5 : 5 + n_layers] / micro,
            "counts_LE": flat[5 + n_layers :].view(n_layers, n_experts),
        }


def load_share(counts_LE: torch.Tensor) -> torch.Tensor:
    """Share of routed rows per expert, per layer [L, E] (rows sum to 1; zeros stay zeros)."""
    return counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)


def load_cv(counts_LE: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of the expert load per layer [L] (0 = perfectly balanced)."""
    mean = counts_LE.mean(-1)
    return counts_LE.std(-1, unbiased=False) / mean.clamp_min(1e-12)


class TopKLoadProbe:
    """Per layer, how many tokens each expert would get from the router's top-k on the clean logits."""

    def __init__(self, model: nn.Module):
        blocks = moe_blocks(model)
        self.counts: list[torch.Tensor | None] = [None] * len(blocks)
        self.handles = [b.gate.register_forward_hook(self._hook_for(i)) for i, b in enumerate(blocks)]

    def _hook_for(self, layer: int):
        def hook(module: DiveRouter, _inputs, output) -> None:
            with torch.no_grad():
                top_TK = torch.topk(output.logits_TE, module.top_k, dim=-1).indices
                self.counts[layer] = torch.bincount(top_TK.flatten(), minlength=output.logits_TE.shape[-1])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BalanceLoss:
    """Switch-style load-balancing loss from forward hooks on the routers.

    Per layer: E * sum_e f_e * P_e, with f_e the share of the top-k (clean-logit) choices that
    go to expert e and P_e the mean softmax probability of e; averaged over layers. Equals 1
    when the router is uniform. Hooks are only installed when the coefficient is > 0.
    """

    def __init__(self, model: nn.Module):
        self.terms: list[torch.Tensor] = []
        self.handles = [b.gate.register_forward_hook(self._hook) for b in moe_blocks(model)]

    def _hook(self, module: DiveRouter, _inputs, output) -> None:
        logits_TE = output.logits_TE
        num_experts = logits_TE.shape[-1]
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_TK = torch.topk(logits_TE.detach(), module.top_k, dim=-1).indices
        share_E = F.one_hot(top_TK, num_experts).sum(1).float().mean(0) / module.top_k
        self.terms.append(num_experts * (share_E * probs_TE.mean(0)).sum())

    def start(self) -> None:
        self.terms.clear()

    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("BalanceLoss: no router ran since start()")
        return torch.stack(self.terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TrainLogger:
    """Rank 0 writes: TensorBoard scalars and images, and one JSON line per step (metrics.jsonl)."""

    def __init__(self, out_dir: Path, tensorboard: bool, rank: int, purge_step: int | None = None):
        self.rank = rank
        self.writer = None
        self.jsonl = None
        if rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)

    def record(self, row: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(row) + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def moe_scalars(
        self, counts_LE: torch.Tensor, entropy_L: torch.Tensor, step: int, per_expert: bool
    ) -> None:
        if self.writer is None:
            return
        share, cv = load_share(counts_LE), load_cv(counts_LE)
        values = {"moe/load_cv_mean": cv.mean().item(), "moe/router_entropy_mean": entropy_L.mean().item()}
        for layer in range(share.shape[0]):
            values[f"moe/load_cv/layer_{layer:02d}"] = cv[layer].item()
            values[f"moe/router_entropy/layer_{layer:02d}"] = entropy_L[layer].item()
            if per_expert:
                for e in range(share.shape[1]):
                    values[f"moe/load/layer_{layer:02d}/expert_{e:02d}"] = share[layer, e].item()
        self.scalars(values, step)

    def heatmap(self, counts_LE: torch.Tensor, step: int, title: str) -> None:
        if self.writer is None or counts_LE.sum() == 0:
            return
        self.writer.add_figure(
            "moe/expert_load_heatmap", expert_load_figure(load_share(counts_LE), title), step
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def expert_load_figure(share_LE: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_experts = share_LE.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_experts, 1.0 + 0.28 * n_layers))
    im = ax.imshow(
        share_LE.numpy(),
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(share_LE.max()), 2.0 / n_experts),
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_experts))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    return fig
