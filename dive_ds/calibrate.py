"""One streaming pass of the dense model over every domain's calibration tokens.

Layer by layer: the hidden states of all calibration windows are carried from layer l to
l + 1 while only layer l's weights are resident (read lazily from safetensors). A pre-hook
on `mlp.down_proj` accumulates, per domain, the sufficient statistics of its input
(count, sum, sum of squares; float64), and a pre-hook on `mlp` the sum of the MLP input
(for router initialisation). Every window is exactly L tokens of one domain, so there is
no padding and no sequence crosses a window boundary.

Legend: S windows, L seq len, H hidden, F FFN width, D domains.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dive_ds.data.sampler import DomainSamples
from dive_ds.models.loading import LayerwiseCheckpoint, check_gated_mlp, model_fingerprint
from dive_ds.outputs import check_not_input
from dive_ds.stats import ChannelStats

STATS_FILE = "stats.safetensors"
SAMPLES_FILE = "samples.safetensors"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CalibConfig:
    """Streaming-pass settings."""

    batch_size: int = 8
    """Windows per forward call."""
    hidden_offload_dir: str | None = None
    """Keep the carried hidden states in a memory-mapped file here instead of RAM (huge runs)."""
    progress: bool = True
    """Show a progress bar with tokens/s."""


def decoder_classes(config):
    """(DecoderLayer class, RotaryEmbedding class) of a transformers causal-LM architecture."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__]
    layer_cls = next(getattr(module, n) for n in dir(module) if n.endswith("DecoderLayer"))
    rope_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    return layer_cls, rope_cls


def build_layer(config, layer_cls, idx: int, state: dict[str, torch.Tensor], dtype=torch.float32):
    with torch.device("meta"):
        layer = layer_cls(config, idx)
    layer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return layer.eval()


def _hidden_buffer(shape, scratch: str | None) -> torch.Tensor:
    """The carried hidden states: in RAM, or memory-mapped in a file in the private folder `scratch`."""
    if scratch is None:
        return torch.empty(shape, dtype=torch.float32)
    mm = np.memmap(os.path.join(scratch, "hidden.f32"), dtype=np.float32, mode="w+", shape=tuple(shape))
    return torch.from_numpy(mm)


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


@torch.no_grad()
def streaming_stats(
    model_dir: str | Path, windows: dict[str, torch.Tensor], cfg: CalibConfig = CalibConfig()
) -> tuple[ChannelStats, dict]:
    """Per-domain, per-layer statistics of the down_proj input; returns (stats, timing info)."""
    with offload_scratch(cfg.hidden_offload_dir) as scratch:
        return _streaming_stats(model_dir, windows, cfg, scratch)


def _streaming_stats(
    model_dir: str | Path, windows: dict[str, torch.Tensor], cfg: CalibConfig, scratch: str | None
) -> tuple[ChannelStats, dict]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_gated_mlp(config)
    config._attn_implementation = "sdpa"  # is_causal with no mask; eager would need an explicit mask
    ckpt = LayerwiseCheckpoint(model_dir)
    layer_cls, rope_cls = decoder_classes(config)
    names = list(windows)
    n_layers, hidden, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    seq_len = next(iter(windows.values())).shape[1]
    counts = torch.tensor([w.numel() for w in windows.values()], dtype=torch.float64)
    n_dom = len(names)
    st = ChannelStats(
        counts,
        torch.zeros(n_dom, n_layers, ffn, dtype=torch.float64),
        torch.zeros(n_dom, n_layers, ffn, dtype=torch.float64),
        torch.zeros(n_dom, n_layers, hidden, dtype=torch.float64),
        torch.zeros(n_layers, ffn, dtype=torch.float64),
        torch.zeros(n_layers, ffn, dtype=torch.float64),
    )

    all_ids = torch.cat([windows[n] for n in names])  # [S, L]
    owner = torch.cat([torch.full((windows[n].shape[0],), d) for d, n in enumerate(names)])
    emb = ckpt.get("model.embed_tokens.weight").to(torch.float32)
    hid = _hidden_buffer((all_ids.shape[0], seq_len, hidden), scratch)
    for i in range(0, all_ids.shape[0], 256):
        hid[i : i + 256] = torch.nn.functional.embedding(all_ids[i : i + 256], emb)
    del emb
    rope = rope_cls(config=config)
    pos = torch.arange(seq_len).unsqueeze(0)
    position_embeddings = rope(hid[:1], pos)

    # batches never straddle two domains, so one "current domain" index per forward is exact
    batches = []
    for d in range(n_dom):
        idx = (owner == d).nonzero().flatten()
        batches += [(d, idx[j : j + cfg.batch_size]) for j in range(0, len(idx), cfg.batch_size)]
    current = {"d": 0}

    def down_hook(_mod, args):
        x = args[0].reshape(-1, ffn).to(torch.float64)
        st.sum_DLF[current["d"], current["l"]] += x.sum(0)
        st.sumsq_DLF[current["d"], current["l"]] += (x * x).sum(0)

    def mlp_hook(_mod, args):
        st.mlp_in_sum_DLH[current["d"], current["l"]] += args[0].reshape(-1, hidden).to(torch.float64).sum(0)

    total_tokens = all_ids.numel()
    bar = tqdm(
        total=n_layers * total_tokens,
        unit="tok",
        unit_scale=True,
        disable=not cfg.progress,
        desc="calibrate",
        dynamic_ncols=True,
    )
    t0 = time.time()
    for layer_idx in range(n_layers):
        layer = build_layer(config, layer_cls, layer_idx, ckpt.layer_state(layer_idx))
        w_down = layer.mlp.down_proj.weight.to(torch.float64)
        st.down_colsq_LF[layer_idx] = (w_down * w_down).sum(0)
        st.down_colabs_LF[layer_idx] = w_down.abs().sum(0)
        current["l"] = layer_idx
        h1 = layer.mlp.down_proj.register_forward_pre_hook(down_hook)
        h2 = layer.mlp.register_forward_pre_hook(mlp_hook)
        for d, idx in batches:
            current["d"] = d
            x = hid[idx]
            cos, sin = position_embeddings
            out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
            hid[idx] = out[0] if isinstance(out, tuple) else out
            bar.update(idx.numel() * seq_len)
        h1.remove()
        h2.remove()
        del layer, w_down, out, x
        gc.collect()  # decoder layers hold reference cycles; free this one before loading the next
        elapsed = time.time() - t0
        bar.set_postfix(
            layer=f"{layer_idx + 1}/{n_layers}",
            model_tok_s=f"{total_tokens * (layer_idx + 1) / n_layers / elapsed:.0f}",
        )
    bar.close()
    elapsed = time.time() - t0
    info = {
        "tokens": total_tokens,
        "layers": n_layers,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(total_tokens / elapsed, 1),
        "passes_over_data": 1,
    }
    return st, info


def _git_rev() -> str | None:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


def run_manifest_base(kind: str) -> dict:
    import dive_ds

    return {
        "kind": kind,
        "dive_ds_version": dive_ds.__version__,
        "git_rev": _git_rev(),
        "torch": torch.__version__,
    }


def check_out_dir(out: Path, identity: dict, force: bool) -> bool:
    """True if `out` already holds this exact run (reuse it); raise if it holds another run,
    unless `force` (then it will be replaced)."""
    man = out / MANIFEST
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file, not a folder; choose another --out")
    if man.exists():
        old = json.loads(man.read_text()).get("identity")
        if old == identity:
            return True
        if old != identity and not force:
            raise ValueError(
                f"output folder {out} holds a different run ({man}); choose another --out or pass --force"
            )
    elif any(out.iterdir()) and not force:
        raise ValueError(
            f"output folder {out} is not empty and holds no {MANIFEST}; choose another --out or pass --force"
        )
    return False


def write_calibration(
    out: Path, stats: ChannelStats, samples: dict[str, DomainSamples], manifest: dict, force: bool = False
) -> Path:
    """Write stats + samples + manifest atomically (temp folder, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, tmp / STATS_FILE)
        tensors = {}
        for name, s in samples.items():
            tensors[f"calib.{name}"] = s.calib.contiguous()
            tensors[f"eval.{name}"] = s.eval.contiguous()
        save_file(tensors, tmp / SAMPLES_FILE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Calibration:
    """A calibration run folder, loaded: statistics, windows and manifest."""

    path: Path
    stats: ChannelStats
    domains: list[str]
    families: dict[str, str | None]
    calib: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not (path / MANIFEST).exists() or not (path / STATS_FILE).exists():
        raise ValueError(
            f"{path} is not a calibration folder (no {MANIFEST}/{STATS_FILE}); "
            "run `dive-ds calibrate --out DIR` first"
        )
    man = json.loads((path / MANIFEST).read_text())
    stats = ChannelStats.from_tensors(load_file(path / STATS_FILE))
    samples = load_file(path / SAMPLES_FILE)
    names = [d["name"] for d in man["domains"]]
    return Calibration(
        path,
        stats,
        names,
        {d["name"]: d.get("family") for d in man["domains"]},
        {n: samples[f"calib.{n}"] for n in names},
        {n: samples[f"eval.{n}"] for n in names},
        man,
    )


def check_same_model(cal: Calibration, model_dir: str | Path) -> None:
    """Statistics must come from this very model (shapes and a weight fingerprint)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    ffn = cal.stats.sum_DLF.shape
    if (ffn[1], ffn[2]) != (config.num_hidden_layers, config.intermediate_size):
        raise ValueError(
            f"statistics in {cal.path} are for {ffn[1]} layers x {ffn[2]} FFN channels but {model_dir} "
            f"has {config.num_hidden_layers} x {config.intermediate_size}: they come from another model; "
            "re-run `dive-ds calibrate` on this model"
        )
    fp = model_fingerprint(config, LayerwiseCheckpoint(model_dir))
    if fp != cal.fingerprint:
        raise ValueError(
            f"statistics in {cal.path} have model fingerprint {cal.fingerprint} but {model_dir} has {fp}: "
            "they come from another model; re-run `dive-ds calibrate` on this model"
        )


def run_calibration(
    model: str,
    registry_path: str,
    out: str | Path,
    sampler_cfg,
    domains: list[str] | None = None,
    calib_cfg: CalibConfig = CalibConfig(),
    force: bool = False,
) -> Path:
    """Registry + model -> calibration folder (validates everything before the heavy pass)."""
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.sampler import sample_domain_text
    from dive_ds.models.loading import load_config, load_tokenizer, local_snapshot, resolve_model

    out = Path(out)
    model_ref = resolve_model(model)
    config = load_config(model_ref)
    registry = load_registry(registry_path)
    chosen = registry.select(domains)
    identity = {
        "model": str(model_ref),
        "registry": str(registry.path),
        "domains": [d.name for d in chosen],
        "sampler": asdict(sampler_cfg),
    }
    inputs = {"model": model_ref if isinstance(model_ref, Path) else None, "registry": registry.path}
    check_not_input(out, inputs | {"hidden offload folder": calib_cfg.hidden_offload_dir})
    if check_out_dir(out, identity, force):
        print(f"{out} already holds this calibration run; reusing it (delete it to recompute)")
        return out
    check_offload_dir(calib_cfg.hidden_offload_dir)
    model_dir = local_snapshot(model_ref)
    tok = load_tokenizer(model_dir, config)
    t0 = time.time()
    samples: dict[str, DomainSamples] = {}
    for d in chosen:
        texts = list(iter_documents(d, max_chars=sampler_cfg.chars_budget()))
        samples[d.name] = sample_domain_text(d.name, texts, tok, sampler_cfg)
    t_sample = time.time() - t0
    stats, info = streaming_stats(model_dir, {n: s.calib for n, s in samples.items()}, calib_cfg)
    manifest = run_manifest_base("calibration") | {
        "identity": identity,
        "model": {
            "path": str(Path(model_dir).resolve()),  # absolute: mine/reconstruct find it from any directory
            "fingerprint": model_fingerprint(config, LayerwiseCheckpoint(model_dir)),
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
        },
        "sampler": asdict(sampler_cfg),
        "domains": [
            {
                "name": d.name,
                "family": d.family,
                "documents": samples[d.name].documents,
                "calib_pool_tokens": samples[d.name].calib_pool_tokens,
                "calib_tokens": samples[d.name].calib.numel(),
                "eval_tokens": samples[d.name].eval.numel(),
            }
            for d in chosen
        ],
        "pass": info | {"sampling_seconds": round(t_sample, 2)},
    }
    write_calibration(out, stats, samples, manifest, force=True)
    return out
