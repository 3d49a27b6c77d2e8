"""Routers fitted from the dense model: reconstruction-error labels, one multinomial regression per layer.

For every calibration token at layer l, the dense FFN's output on the MoE's own MLP input x is the
target; the label is the expert whose output (FLAP bias included) comes closest to it in squared
error. The layer's router (E x H, no bias, as the model has) is then fitted as a multinomial
logistic regression x -> label (L-BFGS, L2), and the hidden states are carried through the MoE
layer routed by the router just fitted, so layer l + 1 is fitted on exactly what it will serve.

Streaming like calibration: one MoE decoder layer and one dense MLP resident (on the compute
device, in the compute dtype), the calibration windows' hidden states carried from layer to layer
(float32; on the GPU when they fit there, else on the host). Works on an HF dive_moe folder and on a
sharded folder from `reconstruct --shards`; writes a new folder (never touches the input).

On many ranks each rank carries its share of the windows and keeps its tokens' rows: the feature
scales, the whitening covariance (H x H, from every k-th fit window), the L-BFGS loss and its E x H gradient
are float64 sums (of float32 sums per window) all-reduced over ranks, so every rank runs the same L-BFGS on
all tokens (router_math's *_sharded functions; one rank runs the same code); only two scalars per token are
gathered (for the medians of the soft-target temperature and the noise init), and rank 0's fitted
weights are broadcast. Memory per rank is O(its own tokens), plus the dense intermediate (T x F) of sliced
experts when it fits in a quarter of the memory left beside the compute.

Targets for top-k > 1: "soft" = softmax(-err / tau) over the experts (tau per layer = the median gap
between the best and second-best expert's error), so the router's top-k and its weights among
them both follow the reconstruction errors; "hard" = the arg-min label (the default for k = 1).

Legend: T tokens, H hidden, E experts, F expert width, W windows, S window length.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from dive_ds.build.router_config import RouterFitConfig
from dive_ds.build.router_math import (
    excess_error,
    expert_errors,
    fit_linear_router,
    fit_linear_router_sharded,
    label_accuracy,
    noise_weight_init,
    noise_weight_init_sharded,
    removed_channels,
    removed_down_columns,
    routing_sums,
    sliced_channels,
    sliced_errors,
    soft_targets,
    soft_temperature,
    soft_temperature_sharded,
    whitening_windows,
)
from dive_ds.io.layers import MoeLayers, build_moe_layer
from dive_ds.parallel.ranks import Ranks, fits_beside, host_memory_per_rank

FIT_FILE = "router_fit.json"


def _dense_mlp(dense, layer: int):
    p = f"model.layers.{layer}.mlp."
    got = dense.get_many([p + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")])
    return [got[p + n].to(torch.float32) for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]


def _each_expert(experts, x_TH: torch.Tensor) -> torch.Tensor:
    """Every expert's output (bias included) on every token -> y_ETH, through the experts' own dispatch."""
    ones = torch.ones(x_TH.shape[0], 1, device=x_TH.device, dtype=x_TH.dtype)
    return torch.stack(
        [
            experts(x_TH, torch.full((x_TH.shape[0], 1), e, device=x_TH.device), ones)[0]
            for e in range(experts.num_experts)
        ]
    )


def sliced_block_output(
    mlp, x_TH: torch.Tensor, h_TF: torch.Tensor, kept: list[torch.Tensor]
) -> torch.Tensor:
    """The MoE block's output on x when its routed experts are exact slices of the dense FFN (channels
    `kept[e]`), from the dense intermediate h = act(x W_gate^T) * (x W_up^T) already computed: the block's own
    routing, weights and shared expert, and each expert's output W_down[:, kept] h[kept] + b_e (its own
    down_proj; `kept` on h's device), so no expert runs its gate and up projections again. Equal to `mlp(x)`
    up to float rounding."""
    from dive_ds.models.moe import add_shared, permute, unpermute

    experts = mlp.experts
    top_idx_TK, weights_TK, _ = mlp.route(x_TH)
    h_NF, order_N, counts_E = permute(h_TF, top_idx_TK, experts.num_experts)
    y_NH = torch.empty(h_NF.shape[0], x_TH.shape[1], dtype=x_TH.dtype, device=x_TH.device)
    at = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            bias = None if experts.bias is None else experts.bias[e]
            y_NH[at : at + n] = F.linear(
                h_NF[at : at + n].index_select(1, kept[e]), experts.down_proj[e], bias
            )
        at += n
    return add_shared(mlp, x_TH, unpermute(y_NH, order_N, weights_TK, x_TH.shape[0]))


def carry_device(device: torch.device, nbytes: int, share: float = 0.5) -> torch.device:
    """Where the carried hidden states live: the GPU when `nbytes` is under `share` of its free memory
    (the rest is for the resident layer, its activations and the gathered fit rows), else the host."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < share * free else torch.device("cpu")


def check_fit_memory(ranks, need: int, where: torch.device, windows_per_domain: int) -> None:
    """Refuse, on every rank alike, a fit whose carried and gathered rows (`need` bytes per rank) exceed the
    host memory a rank may use (on a GPU `carry_device` already fell back to the host when they did not fit)."""
    avail = host_memory_per_rank() if where.type == "cpu" else None
    too_big = avail is not None and need > avail
    if (ranks or Ranks()).any(too_big):
        fewer = max(1, int(windows_per_domain * (avail or need) / need * 0.8))
        raise ValueError(
            f"fit-router would hold ~{need / 2**30:.1f} GiB per rank ("
            + (
                "its windows' hidden states, x and errors of a layer"
                if ranks is not None and ranks.distributed
                else "every window's x and errors of a layer are gathered on every rank"
            )
            + f") but a rank may use ~{(avail or 0) / 2**30:.1f} GiB here; pass "
            f"--fit-windows {fewer} (or fewer) or start fewer ranks per node"
        )


def _fit_whole(
    x, err, fit_on, w_init, num_experts, target_kind, cfg, block, cov_blocks
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One rank: fit the layer's router on all fit tokens -> (w, noise_weight, the layer's report)."""
    x_fit, err_fit = x[fit_on], err[fit_on].to(torch.float64)
    tau = soft_temperature(err_fit)
    if num_experts == 1:
        w = torch.zeros(1, x.shape[1], device=x.device)
    else:
        tgt = err_fit.argmin(-1) if target_kind == "hard" else soft_targets(err_fit, tau).to(torch.float32)
        w = fit_linear_router(x_fit, tgt, num_experts, cfg.l2, cfg.max_iter, cfg.tolerance, block, cov_blocks)
    nw = noise_weight_init(x_fit, w, cfg.noise_ratio)
    x_held, err_held = x[~fit_on], err[~fit_on]
    return (
        w,
        nw,
        {
            "label_accuracy_fit": round(label_accuracy(x_fit, w, err_fit), 4),
            "label_accuracy_heldout": round(label_accuracy(x_held, w, err_held), 4),
            "excess_error_heldout": round(excess_error(x_held, w, err_held), 4),
            "label_accuracy_heldout_init": round(label_accuracy(x_held, w_init, err_held), 4),
            "excess_error_heldout_init": round(excess_error(x_held, w_init, err_held), 4),
            "label_share": torch.bincount(err_fit.argmin(-1), minlength=num_experts)
            .div(len(err_fit))
            .tolist(),
            "soft_tau": tau,
            "max_abs_weight": round(w.abs().max().item(), 3),
        },
    )


def _fit_sharded(ranks, x, err, fit_on, w_init, num_experts, target_kind, cfg, block, cov_blocks):
    """Several ranks, each with its own tokens' rows only: the same fit from all-reduced sums (and gathered
    per-token scalars for the medians) -> (w, noise_weight, the layer's report), equal on every rank."""
    reduce, gather = ranks.sum_, ranks.gather_rows
    x_fit, err_fit = x[fit_on], err[fit_on].to(torch.float64)
    tau = soft_temperature_sharded(err_fit, gather)
    if num_experts == 1:
        w = torch.zeros(1, x.shape[1], device=x.device)
    else:
        tgt = err_fit.argmin(-1) if target_kind == "hard" else soft_targets(err_fit, tau).to(torch.float32)
        w = fit_linear_router_sharded(
            x_fit, tgt, num_experts, reduce, cfg.l2, cfg.max_iter, cfg.tolerance, block, cov_blocks
        )
    nw = noise_weight_init_sharded(x_fit, w, cfg.noise_ratio, reduce, gather)
    x_held, err_held = x[~fit_on], err[~fit_on].to(torch.float64)
    fit, held, init = (reduce(routing_sums(a, b, c)) for a, b, c in
                       ((x_fit, w, err_fit), (x_held, w, err_held), (x_held, w_init, err_held)))  # fmt: skip

    def share(t, i):
        return t[i].item() / t[0].item() if t[0].item() else float("nan")

    def excess(t):
        return t[2].item() / max(t[3].item(), 1e-30) if t[0].item() else float("nan")

    return (
        w,
        nw,
        {
            "label_accuracy_fit": round(share(fit, 1), 4),
            "label_accuracy_heldout": round(share(held, 1), 4),
            "excess_error_heldout": round(excess(held), 4),
            "label_accuracy_heldout_init": round(share(init, 1), 4),
            "excess_error_heldout_init": round(excess(init), 4),
            "label_share": (fit[4:].to(torch.float32) / fit[0].item()).tolist(),  # as _fit_whole: float32
            "soft_tau": tau,
            "max_abs_weight": round(w.abs().max().item(), 3),
        },
    )


# --------------------------------------------------------------------------- the streaming fit


@torch.no_grad()
def fit_routers(
    moe_dir: str | Path,
    dense_dir: str | Path,
    windows: dict[str, torch.Tensor],
    cfg: RouterFitConfig = RouterFitConfig(),
    ranks: Ranks | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Fit every layer's router in one streaming pass -> ({layer: {'gate.weight', 'gate.noise_weight'}}, report).

    `ranks` (default: one rank on the CPU) gives the compute device and this rank's windows; the resident
    layer computes in `dtype`, the carried states, x and the errors stay float32."""
    from tqdm import tqdm
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from dive_ds.io.loading import LayerwiseCheckpoint

    ranks = ranks or Ranks()
    dev = ranks.device
    moe = MoeLayers(moe_dir)
    config = moe.config
    act = ACT2FN[config.hidden_act]
    config._attn_implementation = "sdpa"
    dense = LayerwiseCheckpoint(dense_dir)
    num_experts, top_k, hidden = config.num_local_experts, config.num_experts_per_tok, config.hidden_size
    target_kind = cfg.target if cfg.target != "auto" else ("hard" if top_k == 1 else "soft")
    names = list(windows)
    if cfg.windows_per_domain is not None:
        windows = {n: w[: cfg.windows_per_domain] for n, w in windows.items()}
    ids_WS = torch.cat([windows[n] for n in names])
    n_win, seq_len = ids_WS.shape
    ranks.check_items(n_win, "calibration windows (over all domains)")
    # every holdout_every-th window (over all domains in order) is held out of the fit: label accuracy is
    # measured there
    held = torch.arange(n_win) % cfg.holdout_every == cfg.holdout_every - 1
    fit_tok = held.logical_not().repeat_interleave(seq_len)
    mine_W = torch.tensor(ranks.share(n_win), dtype=torch.long)  # this rank's windows, carried by it
    n_mine = mine_W.numel() * seq_len
    # carried on this rank: hid, resid, x (T_r x H) and err (T_r x E). One rank: the fit reads them as they
    # are. Several: no token rows leave their rank (the fit all-reduces sums; two scalars per token are
    # gathered for the medians), so a rank holds O(its own tokens)
    n_tok = ids_WS.numel()
    sharded = ranks.distributed
    gathered = 2 * 8 * n_tok if sharded else 4 * n_tok * (hidden + num_experts)
    need = 4 * n_mine * (4 * hidden + num_experts) + gathered  # + the fit rows' inputs, copied once
    carry = carry_device(dev, need)
    check_fit_memory(ranks, need, carry, max(w.shape[0] for w in windows.values()))
    fit_on = fit_tok.to(carry)
    # the fit's whitening covariance: every k-th fit window by its global index, the same on any number of ranks
    cov_blocks = whitening_windows(
        mine_W[held[mine_W].logical_not()], int(held.logical_not().sum()), seq_len, hidden
    )
    fit_mine = held[mine_W].logical_not().repeat_interleave(seq_len).to(carry)
    embed = moe.get("model.embed_tokens.weight").to(torch.float32)
    hid = F.embedding(ids_WS[mine_W], embed).to(carry)
    del embed
    pos = torch.arange(seq_len, device=dev).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(config=config).to(dev)(hid[:1].to(dev, dtype), pos)
    routers: dict[int, dict[str, torch.Tensor]] = {}
    layers_report = []
    bar = tqdm(total=config.num_hidden_layers * n_mine, unit="tok", unit_scale=True,
               disable=not (cfg.progress and ranks.is_main), desc="fit-router", dynamic_ncols=True)  # fmt: skip
    t0 = time.time()
    sliced_layers = 0
    fit_s = 0.0
    for layer in range(config.num_hidden_layers):
        block = build_moe_layer(config, layer, moe.layer_state(layer))
        w_gate, w_up, w_down = _dense_mlp(dense, layer)
        kept = sliced_channels(block.mlp.experts, w_gate, w_up, w_down) if cfg.sliced_shortcut else None
        routed_kept = kept
        shared = getattr(
            block.mlp, "shared_expert", None
        )  # always on: the labels are the routed part's error
        if kept is not None and shared is not None:
            shared_kept = sliced_channels(shared, w_gate, w_up, w_down)
            kept = None if shared_kept is None else [torch.cat([shared_kept[0], k]) for k in kept]
        sliced_layers += kept is not None
        block = block.to(dev, dtype)
        w_gate, w_up, w_down = (w.to(dev, dtype) for w in (w_gate, w_up, w_down))
        removed = down_removed = h_mine = None
        if kept is not None:
            common, own = removed_channels(kept, w_down.shape[1])
            removed = common.to(dev), [r.to(dev) for r in own]
            down_removed = removed_down_columns(w_down, removed)  # gathered once a layer, not per batch
            routed_kept = [k.to(dev) for k in routed_kept]

        def dense_h(x, w_gate=w_gate, w_up=w_up):  # the dense intermediate: one expression for both passes
            return act(F.linear(x, w_gate)) * F.linear(x, w_up)

        resid = torch.empty(n_mine, hidden, device=carry)
        x_mine = torch.empty(n_mine, hidden, device=carry)
        err_mine = torch.empty(n_mine, num_experts, device=carry)
        # sliced experts carry each token through its expert's slice of the dense intermediate h (one
        # down-projection, `sliced_block_output`); h is kept from the error pass when it fits beside the
        # compute (in the compute dtype, with room left for the fit's copies), else computed again per batch
        # with the very same matmuls, so the carried states do not depend on free memory
        elem = torch.empty((), dtype=dtype).element_size()
        if (
            kept is not None
            and carry == dev
            and fits_beside(
                elem * n_mine * w_down.shape[1], carry, reserve=4 * n_mine * (hidden + num_experts)
            )
        ):
            h_mine = torch.empty(n_mine, w_down.shape[1], device=carry, dtype=dtype)
        for i in range(0, mine_W.numel(), cfg.batch_size):
            h = hid[i : i + cfg.batch_size].to(dev, dtype)
            a = block.self_attn(
                hidden_states=block.input_layernorm(h), position_embeddings=cos_sin, attention_mask=None
            )[0]
            r = (h + a).reshape(-1, hidden)
            x = block.post_attention_layernorm(r)
            h = dense_h(x)
            rows = slice(i * seq_len, i * seq_len + r.shape[0])
            resid[rows], x_mine[rows] = r.float().to(carry), x.float().to(carry)
            if h_mine is not None:
                h_mine[rows] = h
            if kept is not None:
                e = sliced_errors(h, w_down, removed, block.mlp.experts.bias, down_removed)
            else:
                target = F.linear(h, w_down)
                if shared is not None:
                    target = target - shared.mlp(x, torch.tensor([x.shape[0]], device=x.device))
                e = expert_errors(target, _each_expert(block.mlp.experts, x))
            err_mine[rows] = e.float().to(carry)
            bar.update(r.shape[0])
        w_init = block.mlp.gate.weight.detach().to(carry, torch.float32)
        tf = time.time()
        if sharded:
            w, nw, report = _fit_sharded(
                ranks, x_mine, err_mine, fit_mine, w_init, num_experts, target_kind, cfg, seq_len, cov_blocks
            )
        else:
            w, nw, report = _fit_whole(
                x_mine, err_mine, fit_on, w_init, num_experts, target_kind, cfg, seq_len, cov_blocks
            )
        fit_s += time.time() - tf
        ranks.broadcast_(w)  # every rank carries its windows on through the very same router
        ranks.broadcast_(nw)
        routers[layer] = {"gate.weight": w.cpu(), "gate.noise_weight": nw.cpu()}
        block.mlp.gate.weight.data = w.to(dev, dtype, copy=True)
        block.mlp.gate.mode = "sparse"
        layers_report.append({"layer": layer, **report})
        for i in range(0, n_mine, cfg.batch_size * seq_len):
            rows = slice(i, i + cfg.batch_size * seq_len)
            x = x_mine[rows].to(dev, dtype)
            if kept is None:
                y = block.mlp(x.unsqueeze(0))[0]
            else:
                h = h_mine[rows] if h_mine is not None else dense_h(x)
                y = sliced_block_output(block.mlp, x, h, routed_kept)
            hid.view(-1, hidden)[rows] = resid[rows] + y.float().to(carry)
        # a decoder layer holds reference cycles: move its weights off so they are freed now, without a
        # gc.collect() per layer (about a second each in a large Python process, as in calibrate)
        block.to("meta")
        del block, w_gate, w_up, w_down, resid, x_mine, err_mine, h_mine, down_removed, dense_h
        bar.set_postfix(layer=f"{layer + 1}/{config.num_hidden_layers}",
                        acc=f"{layers_report[-1]['label_accuracy_heldout']:.2f}")  # fmt: skip
    bar.close()
    seconds = time.time() - t0
    report = {
        "config": asdict(cfg),
        "target": target_kind,
        "num_experts": num_experts,
        "top_k": top_k,
        "tokens": n_tok,
        "fit_tokens": int(fit_tok.sum()),
        "heldout_tokens": int(n_tok - fit_tok.sum()),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tok / max(seconds, 1e-9), 1),
        "ranks": ranks.world,
        "device": dev.type,
        "dtype": str(dtype).removeprefix("torch."),
        "carried_on": carry.type,
        "gathered_bytes_per_layer": gathered,
        "fit_seconds": round(fit_s, 3),
        "sliced_layers": sliced_layers,
        "mean_label_accuracy_heldout": round(
            sum(r["label_accuracy_heldout"] for r in layers_report) / len(layers_report), 4
        ),
        "mean_excess_error_heldout": round(
            sum(r["excess_error_heldout"] for r in layers_report) / len(layers_report), 4
        ),
        "layers": layers_report,
    }
    return routers, report
