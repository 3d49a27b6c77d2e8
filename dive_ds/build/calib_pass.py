"""The calibration pass: the dense model streamed layer by layer (one decoder layer resident, hidden
states carried, windows split over ranks), collecting every layer's down_proj input statistics per domain."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dive_ds.io.layers import build_layer, decoder_classes
from dive_ds.io.loading import LayerwiseCheckpoint, check_gated_mlp, model_fingerprint
from dive_ds.parallel.ranks import DTYPES, Ranks, fits_beside
from dive_ds.stats import ChannelStats


@dataclass(frozen=True)
class CalibConfig:
    """Streaming-pass settings (the device, the compute dtype and the ranks are arguments, not settings)."""

    batch_size: int = 8
    """Windows per forward call."""
    hidden_offload_dir: str | None = None
    """Keep the carried hidden states in a memory-mapped file here instead of RAM (huge runs)."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    checkpoint_dir: str | None = None
    """Write a resumable checkpoint here (every rank's carried hidden states and partial sums; storage
    that every rank sees). A relaunch of the same run resumes after the last checkpointed layer."""
    checkpoint_every: int = 1
    """Layers between two checkpoints (with checkpoint_dir)."""
    stop_file: str | None = None
    """When this file exists at a layer boundary: write the checkpoint and stop (needs checkpoint_dir)."""
    token_clusters: int = 0
    """C > 0: also cluster every layer's MLP inputs into C clusters (k-means, dive_ds/build/token_clusters.py)
    and keep FLAP statistics per cluster, for `reconstruct --groups-from clusters`."""
    cluster_iters: int = 10
    """Lloyd steps of the k-means at most."""
    cluster_seed: int = 0
    """Seed of the k-means' initial centroids (layer l uses seed + l)."""

    def __post_init__(self):
        if self.token_clusters < 0 or self.cluster_iters < 0:
            raise ValueError(
                f"--token-clusters {self.token_clusters}: use 0 (off) or a number of clusters >= 1"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1 (got {self.batch_size})")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1 layer (got {self.checkpoint_every})")
        if self.stop_file is not None and self.checkpoint_dir is None:
            raise ValueError(
                "--stop-file needs --checkpoint-dir: a stopped pass resumes from the checkpoint it writes there"
            )


class CalibrationStopped(Exception):
    """The pass stopped at a layer boundary (stop file or SIGUSR1) after writing its checkpoint."""

    def __init__(self, done: int, layers: int):
        self.done, self.layers = done, layers
        super().__init__(f"stopped after layer {done}/{layers}; relaunch the same command to resume")


def batch_plan(windows: dict[str, torch.Tensor], batch_size: int) -> list[tuple[int, int, int]]:
    """The global batches (domain, first window, end) in the order of the concatenated windows; a batch
    never straddles two domains, so one "current domain" index per forward is exact."""
    plan, start = [], 0
    for d, w in enumerate(windows.values()):
        n = w.shape[0]
        plan += [(d, start + j, start + min(j + batch_size, n)) for j in range(0, n, batch_size)]
        start += n
    return plan


def checkpoint_identity(
    model_dir: str | Path,
    windows: dict[str, torch.Tensor],
    dtype,
    batch_size: int,
    token_clusters: int = 0,
    cluster_iters: int = 10,
    cluster_seed: int = 0,
) -> dict:
    """What a checkpoint of the pass depends on (not the device nor the world size: the sums are equal)."""
    from transformers import AutoConfig

    from dive_ds.build.calib_checkpoint import windows_sha

    config = AutoConfig.from_pretrained(model_dir)
    identity = {
        "model_fingerprint": model_fingerprint(config, LayerwiseCheckpoint(model_dir)),
        "windows_sha256": windows_sha(windows),
        "dtype": dtype_name(dtype),
        "batch_size": batch_size,
    }
    if token_clusters:  # the per-cluster sums depend on them
        identity["token_clusters"] = [token_clusters, cluster_iters, cluster_seed]
    return identity


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _hidden_buffer(shape, scratch: str | None) -> torch.Tensor:
    """The carried hidden states: in RAM, or memory-mapped in a file in the private folder `scratch`
    (float32 there: a bf16 value survives the round trip exactly)."""
    if scratch is None:
        return torch.empty(shape, dtype=torch.float32)
    mm = np.memmap(os.path.join(scratch, "hidden.f32"), dtype=np.float32, mode="w+", shape=tuple(shape))
    return torch.from_numpy(mm)


def _carry_buffer(shape, dtype, device: torch.device, scratch: str | None, reserve: int):
    """(buffer, where): on the device when it fits beside `reserve` bytes of working memory, else in RAM,
    or memory-mapped when an offload folder is given."""
    if scratch is not None:
        return _hidden_buffer(shape, scratch), "memmap"
    if device.type == "cuda":
        need = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(device)
        if need + reserve < free:
            return torch.empty(shape, dtype=dtype, device=device), "device"
    if dtype == torch.float32:
        return _hidden_buffer(shape, None), "host"
    return torch.empty(shape, dtype=dtype), "host"


def check_offload_dir(offload_dir: str | None) -> None:
    if offload_dir is not None and os.path.exists(offload_dir) and not os.path.isdir(offload_dir):
        raise ValueError(
            f"--hidden-offload-dir {offload_dir} is a file, not a folder; pass a folder on scratch space"
        )


@contextlib.contextmanager
def offload_scratch(offload_dir: str | None):
    """A new private folder inside `offload_dir` (None: no offload). `offload_dir` may hold the user's
    files: the folder made here (and `offload_dir` itself if this made it and it is left empty) is all
    that is created, and all that is removed afterwards, also on error."""
    if offload_dir is None:
        yield None
        return
    check_offload_dir(offload_dir)
    made = not os.path.exists(offload_dir)
    os.makedirs(offload_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=offload_dir, prefix=".dive_ds-calibrate-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(offload_dir)  # only if still empty


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def streaming_stats(
    model_dir: str | Path,
    windows: dict[str, torch.Tensor],
    cfg: CalibConfig = CalibConfig(),
    ranks: Ranks | None = None,
    dtype: torch.dtype = torch.float32,
    stop: threading.Event | None = None,
) -> tuple[ChannelStats, dict]:
    """Per-domain, per-layer statistics of the down_proj input; returns (stats, timing info).

    Every rank carries its share of the batches (`ranks.share`) through all layers, with one layer
    resident on `ranks.device` in `dtype`; the float64 sums are added across ranks at the end, so the
    statistics equal one rank's up to float64 rounding. `stop` (or cfg.stop_file) set at a layer
    boundary: checkpoint, then CalibrationStopped."""
    from dive_ds.build.calib_checkpoint import LayerCheckpoint

    ranks = ranks or Ranks()  # one rank on the CPU
    ranks.check_items(len(batch_plan(windows, cfg.batch_size)), "batches")
    ckpt, start, made_root = None, 0, False
    if cfg.checkpoint_dir is not None:
        identity = checkpoint_identity(model_dir, windows, dtype, cfg.batch_size, cfg.token_clusters,
                                       cfg.cluster_iters, cfg.cluster_seed)  # fmt: skip
        ckpt = LayerCheckpoint(Path(cfg.checkpoint_dir), identity, ranks.world)
        start = ckpt.check()
        made_root = not Path(cfg.checkpoint_dir).exists()
        ranks.barrier()  # every rank has looked before any writes
    with offload_scratch(cfg.hidden_offload_dir) as scratch:
        return _streaming_stats(model_dir, windows, cfg, ranks, dtype, stop, scratch, ckpt, start, made_root)


def _streaming_stats(model_dir, windows, cfg, ranks, dtype, stop, scratch, ckpt, start, made_root):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_gated_mlp(config)
    config._attn_implementation = "sdpa"  # is_causal with no mask; eager would need an explicit mask
    reader = LayerwiseCheckpoint(model_dir)
    layer_cls, rope_cls = decoder_classes(config)
    dev = ranks.device
    n_layers, hidden, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    seq_len = next(iter(windows.values())).shape[1]
    n_dom = len(windows)
    counts = torch.tensor([w.numel() for w in windows.values()], dtype=torch.float64)

    # this rank's batches, back to back in its own buffer: (domain, first, end) there
    all_ids = torch.cat(list(windows.values()))  # [S, L]
    plan = batch_plan(windows, cfg.batch_size)
    mine = [plan[i] for i in ranks.share(len(plan))]
    local, at = [], 0
    for d, a, b in mine:
        local.append((d, at, at + b - a))
        at += b - a
    my_ids = torch.cat([all_ids[a:b] for _, a, b in mine])  # [S_r, L]
    total_tokens, my_tokens = all_ids.numel(), my_ids.numel()

    # this rank's partial sums, float64 on the compute device (each batch is summed there in fp32)
    f64 = dict(dtype=torch.float64, device=dev)
    sum_DLF = torch.zeros(n_dom, n_layers, ffn, **f64)
    sumsq_DLF = torch.zeros(n_dom, n_layers, ffn, **f64)
    mlp_in_sum_DLH = torch.zeros(n_dom, n_layers, hidden, **f64)
    down_colsq_LF = torch.zeros(n_layers, ffn, **f64)
    down_colabs_LF = torch.zeros(n_layers, ffn, **f64)
    partial = {"sum_DLF": sum_DLF, "sumsq_DLF": sumsq_DLF, "mlp_in_sum_DLH": mlp_in_sum_DLH,
               "down_colsq_LF": down_colsq_LF, "down_colabs_LF": down_colabs_LF}  # fmt: skip
    n_cl = cfg.token_clusters
    clusters = {}  # this rank's per-cluster sums: token count [C, L], MLP input [C, L, H], down_proj input [C, L, F]
    if n_cl:
        clusters = {"cl_count": torch.zeros(n_cl, n_layers, **f64), "cl_mlp_in": torch.zeros(n_cl, n_layers, hidden, **f64),
                    "cl_sum": torch.zeros(n_cl, n_layers, ffn, **f64), "cl_sumsq": torch.zeros(n_cl, n_layers, ffn, **f64)}  # fmt: skip
        # this rank's tokens' places in the global token order (the k-means' seeded draw reads it)
        global_T = torch.cat([torch.arange(a * seq_len, b * seq_len) for _, a, b in mine])
        mlp_in_TH = None  # allocated beside the carried states, once they have their place

    elem = torch.empty((), dtype=dtype).element_size()
    layer_bytes = (4 * hidden * hidden + 3 * hidden * ffn) * elem
    act_bytes = cfg.batch_size * seq_len * (3 * ffn + 8 * hidden) * 4
    reserve = 3 * layer_bytes + 2 * act_bytes + (2 << 30)
    if n_cl:  # a layer's MLP inputs (float32) are kept for its clustering: reserve room for them
        reserve += my_ids.numel() * hidden * 4
    hid, where = _carry_buffer((my_ids.shape[0], seq_len, hidden), dtype, dev, scratch, reserve)
    h_TF = None  # a layer's down_proj inputs, kept for its cluster sums when they fit (else computed again)
    if n_cl:  # on the device when the carried states are, else on the host (clustered where they sit)
        keep_on = dev if where == "device" else torch.device("cpu")
        mlp_in_TH = torch.empty(my_ids.numel(), hidden, dtype=torch.float32, device=keep_on)
        # kept when they take under a quarter of the free memory, else computed again from the MLP inputs (the
        # gate and up projections a second time: about 40% of a layer's forward on the demo); in the compute
        # dtype (exact), and only beside the compute (a GPU's copied to the host and back costs more than it saves)
        if keep_on == dev and fits_beside(
            my_ids.numel() * ffn * elem, keep_on, reserve=reserve if where == "device" else 0
        ):
            h_TF = torch.empty(my_ids.numel(), ffn, dtype=dtype, device=keep_on)
    if start == 0:
        emb = reader.get("model.embed_tokens.weight").to(dev, dtype)
        for _, a, b in local:
            hid[a:b] = torch.nn.functional.embedding(my_ids[a:b].to(dev), emb)
        del emb
    else:
        saved = ckpt.load_rank(ranks.rank, start)
        hid.copy_(saved.pop("hidden"))
        for k, t in (partial | clusters).items():
            t.copy_(saved[k])
        del saved
    rope = rope_cls(config=config).to(dev)
    pos = torch.arange(seq_len, device=dev).unsqueeze(0)
    position_embeddings = rope(torch.zeros(1, seq_len, hidden, dtype=dtype, device=dev), pos)

    current = {"d": 0, "l": start, "rows": slice(0, 0)}

    def down_hook(_mod, args):
        x = args[0].reshape(-1, ffn).float()  # [tokens, F], summed in fp32 on the device, added in float64
        sum_DLF[current["d"], current["l"]] += x.sum(0)
        sumsq_DLF[current["d"], current["l"]] += (x * x).sum(0)
        if h_TF is not None:  # kept for the layer's cluster sums
            h_TF[current["rows"]] = args[0].reshape(-1, ffn)

    def mlp_hook(_mod, args):
        mlp_in_sum_DLH[current["d"], current["l"]] += args[0].reshape(-1, hidden).float().sum(0)
        if n_cl:  # kept for the layer's clustering
            mlp_in_TH[current["rows"]] = args[0].reshape(-1, hidden).float().to(mlp_in_TH.device)

    bar = tqdm(
        total=(n_layers - start) * total_tokens,
        unit="tok",
        unit_scale=True,
        disable=not (cfg.progress and ranks.is_main),
        desc="calibrate",
        dynamic_ncols=True,
    )
    watch_stop = stop is not None or cfg.stop_file is not None  # the same on every rank
    t_load = t_compute = 0.0
    t0 = time.perf_counter()
    for layer_idx in range(start, n_layers):
        t = time.perf_counter()
        layer = build_layer(config, layer_cls, layer_idx, reader.layer_state(layer_idx), dtype, dev)
        _sync(dev)
        t_load += time.perf_counter() - t
        t = time.perf_counter()
        w_down = layer.mlp.down_proj.weight.to(torch.float64)
        down_colsq_LF[layer_idx] = (w_down * w_down).sum(0)
        down_colabs_LF[layer_idx] = w_down.abs().sum(0)
        current["l"] = layer_idx
        h1 = layer.mlp.down_proj.register_forward_pre_hook(down_hook)
        h2 = layer.mlp.register_forward_pre_hook(mlp_hook)
        for d, a, b in local:
            current["d"], current["rows"] = d, slice(a * seq_len, b * seq_len)
            x = hid[a:b].to(dev, dtype, non_blocking=True)
            out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=position_embeddings)
            hid[a:b] = out[0] if isinstance(out, tuple) else out
            bar.update((b - a) * seq_len * ranks.world)  # rank 0's share, scaled to the whole world
        h1.remove()
        h2.remove()
        if n_cl:
            rows = [slice(a * seq_len, b * seq_len) for _, a, b in local]
            _cluster_layer(
                layer, layer_idx, mlp_in_TH, h_TF, rows, global_T, total_tokens, cfg, clusters, ranks, dtype
            )
        _sync(dev)
        t_compute += time.perf_counter() - t
        t = time.perf_counter()
        # decoder layers hold reference cycles: move the weights off before dropping the module, so they
        # are freed now, without a full gc.collect() (about a second per layer in a large Python process)
        layer.to("meta")
        del layer, w_down, out, x
        t_load += time.perf_counter() - t  # swapping layers: reading the next and freeing this one
        elapsed = time.perf_counter() - t0
        done = layer_idx + 1
        bar.set_postfix(
            layer=f"{done}/{n_layers}",
            model_tok_s=f"{total_tokens * (done - start) / n_layers / elapsed:.0f}",
        )
        if done == n_layers:
            break
        stopping = watch_stop and ranks.any(
            (stop is not None and stop.is_set())
            or (cfg.stop_file is not None and os.path.exists(cfg.stop_file))
        )
        if ckpt is not None and (stopping or done % cfg.checkpoint_every == 0):
            ckpt.save_rank(ranks.rank, done, {"hidden": hid, **partial, **clusters})
            ranks.barrier()
            if ranks.is_main:
                ckpt.commit(done, n_layers, made_root)
            ranks.barrier()
            ckpt.prune(ranks.rank, done)
        if stopping:
            bar.close()
            raise CalibrationStopped(done, n_layers)
    bar.close()
    elapsed = time.perf_counter() - t0
    for t in (sum_DLF, sumsq_DLF, mlp_in_sum_DLH):
        ranks.sum_(t)  # exact float64 sums of every rank's partial sums
    st = ChannelStats(counts, *(t.cpu() for t in partial.values()))
    cluster_stats = None
    if n_cl:
        for t in clusters.values():
            ranks.sum_(t)
        cluster_stats = ChannelStats(*(clusters[k].cpu() for k in ("cl_count", "cl_sum", "cl_sumsq", "cl_mlp_in")),
                                     st.down_colsq_LF, st.down_colabs_LF)  # fmt: skip
    layers_run = n_layers - start
    row = torch.tensor([[my_tokens, elapsed, t_load, t_compute]], dtype=torch.float64)
    rows = ranks.gather_rows(row).tolist()
    per_rank = [
        {
            "rank": r,
            "tokens": int(tok),
            "seconds": round(sec, 2),
            "tokens_per_s": round(tok * layers_run / n_layers / sec, 1),
            "layer_load_seconds": round(load, 2),
            "compute_seconds": round(comp, 2),
        }
        for r, (tok, sec, load, comp) in enumerate(rows)
    ]
    wall = max(r[1] for r in rows)
    info = {
        "tokens": total_tokens,
        "layers": n_layers,
        "seconds": round(wall, 2),
        "tokens_per_s": round(total_tokens * layers_run / n_layers / wall, 1),
        "passes_over_data": 1,
        "world_size": ranks.world,
        "device": dev.type if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "dtype": dtype_name(dtype),
        "hidden_states_on": where,
        "resumed_after_layer": start,
        "layer_load_seconds": round(t_load, 2),
        "compute_seconds": round(t_compute, 2),
        "per_rank": per_rank,
    }
    if cluster_stats is not None:  # taken out by the caller (dive_ds.build.calibrate writes it beside stats)
        info["token_clusters"] = {"clusters": n_cl, "iters": cfg.cluster_iters, "seed": cfg.cluster_seed,
                                  "smallest_per_layer": [int(n) for n in cluster_stats.count_D.min(0).values]}  # fmt: skip
        info["cluster_stats"] = cluster_stats
    return st, info


def _cluster_layer(
    layer, layer_idx, mlp_in_TH, h_TF, batch_rows, global_T, total, cfg, clusters, ranks, dtype
):
    """Cluster this layer's MLP inputs over every rank's tokens and add each cluster's sums (this rank's
    tokens, a batch at a time) to `clusters`; the down_proj inputs are `h_TF` as the forward kept them, or
    (None) computed again from the kept MLP inputs."""
    from dive_ds.build.token_clusters import cluster_sums, kmeans

    n_cl = cfg.token_clusters
    _, labels = kmeans(mlp_in_TH, global_T.to(mlp_in_TH.device), total, n_cl, cfg.cluster_iters, cfg.cluster_seed + layer_idx,
                       ranks.sum_, ranks.gather_rows)  # fmt: skip
    mlp = layer.mlp
    dev = mlp.gate_proj.weight.device
    for rows in batch_rows:
        x = mlp_in_TH[rows].to(dev)
        if h_TF is not None:
            h = h_TF[rows].float()
        else:
            xd = x.to(dtype)
            h = (mlp.act_fn(mlp.gate_proj(xd)) * mlp.up_proj(xd)).float()
        for k, v in cluster_sums(labels[rows].to(dev), x, h, n_cl).items():
            clusters[f"cl_{k}"][:, layer_idx] += v
