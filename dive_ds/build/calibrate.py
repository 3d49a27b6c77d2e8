"""`dive-ds calibrate`: sample the calibration, selection and evaluation windows of every domain, run the
streaming pass (build/calib_pass.py) and write the calibration folder (io/calibration.py)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

from dive_ds.build.calib_pass import (
    CalibConfig,
    batch_plan,
    check_offload_dir,
    checkpoint_identity,
    streaming_stats,
)
from dive_ds.build.outputs import check_not_input, run_manifest_base
from dive_ds.choices import DEMO
from dive_ds.data.sampler import DomainSamples
from dive_ds.io.calibration import MANIFEST, write_calibration
from dive_ds.io.loading import LayerwiseCheckpoint, model_fingerprint
from dive_ds.parallel.ranks import Ranks


def calibrate(
    model: str | None,
    domains: str | None,
    out: str | None,
    samples_per_domain: int | None = None,
    seq_len: int | None = None,
    eval_windows: int | None = None,
    seed: int = 42,
    only: list[str] | None = None,
    batch_size: int = 8,
    hidden_offload_dir: str | None = None,
    progress: bool = True,
    force: bool = False,
    demo: bool = False,
    device: str = "auto",
    dtype: str = "fp32",
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    stop_file: str | None = None,
    stop=None,
    token_clusters: int = 0,
):
    """`dive-ds calibrate`: one streaming pass, then the summary table (rank 0). With `demo`, DEMO fills
    what is not given. `stop`: a threading.Event that stops the pass at the next layer boundary."""
    from dive_ds.build.calib_pass import CalibConfig
    from dive_ds.data.sampler import SamplerConfig
    from dive_ds.data.split import SplitConfig
    from dive_ds.parallel.ranks import launched_world

    def given(value, default):  # None: not given (0 is a value, and SamplerConfig refuses it)
        return default if value is None else value

    if demo:
        model = model or DEMO["model"]
        domains = domains or DEMO["domains"]
        samples_per_domain = given(samples_per_domain, DEMO["samples_per_domain"])
        seq_len = given(seq_len, DEMO["seq_len"])
        eval_windows = given(eval_windows, DEMO["eval_windows"])
        out = out or f"{DEMO['out']}/calib"
    for flag, value in (("model", model), ("domains", domains), ("out", out)):
        if not value:
            raise ValueError(f"--{flag} is required (or pass --demo for the embedded default)")
    sampler = SamplerConfig(
        samples_per_domain=given(samples_per_domain, 1024),
        seq_len=given(seq_len, 256),
        eval_windows=given(eval_windows, 16),
        seed=seed,
        split=SplitConfig(seed=seed),  # --seed also fixes the four-way split (evaluate --seed reads the same)
    )
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("--checkpoint-every needs --checkpoint-dir (where the checkpoints go)")
    calib_cfg = CalibConfig(
        batch_size=batch_size,
        hidden_offload_dir=hidden_offload_dir,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=given(checkpoint_every, 1),
        stop_file=stop_file,
        token_clusters=token_clusters,
    )
    out = run_calibration(
        model, domains, out, sampler, only, calib_cfg, force=force, device=device, dtype=dtype, stop=stop
    )
    if launched_world()[0] == 0:
        _print_calibration_summary(out)
    return out


def _print_calibration_summary(out) -> None:
    import json

    man = json.loads((Path(out) / "manifest.json").read_text())
    print(
        f"\ncalibration: {out}  (model {man['model']['model_type']}, fingerprint {man['model']['fingerprint']})"
    )
    print(f"{'domain':<20} {'family':<14} {'docs':>6} {'pool tokens':>12} {'calib':>8} {'eval':>7}")
    for d in man["domains"]:
        print(
            f"{d['name']:<20} {str(d['family']):<14} {d['documents']:>6} {d['calib_pool_tokens']:>12} "
            f"{d['calib_tokens']:>8} {d['eval_tokens']:>7}"
        )
    p = man["pass"]
    print(
        f"one pass over {p['tokens']} tokens x {p['layers']} layers in {p['seconds']}s: "
        f"{p['tokens_per_s']} tokens/s (sampling {p['sampling_seconds']}s)"
    )
    if "world_size" in p:
        print(
            f"{p['world_size']} rank(s) on {p['device']}, {p['dtype']}, hidden states on {p['hidden_states_on']}; "
            f"rank 0: layer loading {p['layer_load_seconds']}s, compute {p['compute_seconds']}s"
            + (f"; resumed after layer {p['resumed_after_layer']}" if p["resumed_after_layer"] else "")
        )


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
        if isinstance(old, dict) and "dtype" not in old:
            old = old | {"dtype": "fp32"}  # written before --dtype existed: every pass then was fp32
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


def run_calibration(
    model: str,
    registry_path: str,
    out: str | Path,
    sampler_cfg,
    domains: list[str] | None = None,
    calib_cfg: CalibConfig = CalibConfig(),
    force: bool = False,
    device: str = "auto",
    dtype: str = "fp32",
    stop: threading.Event | None = None,
) -> Path:
    """Registry + model -> calibration folder (validates everything before the heavy pass).

    Launched by torchrun, every rank samples the same windows (deterministic), carries its share of
    the batches, and rank 0 alone writes `out`. Every refusal happens before the process group is
    joined, on every rank alike."""
    from dive_ds.build.calib_checkpoint import LayerCheckpoint
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.sampler import sample_domain_text
    from dive_ds.io.loading import load_config, load_tokenizer, local_snapshot, resolve_model
    from dive_ds.parallel.ranks import launched_world, resolve_device, resolve_dtype, start_ranks

    rank, world, local_rank = launched_world()
    compute_dtype = resolve_dtype(dtype, resolve_device(device, local_rank))
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
        "dtype": dtype,  # bf16 sums differ from fp32 ones; the device and the world size do not change them
    }
    if calib_cfg.token_clusters:
        identity["token_clusters"] = [
            calib_cfg.token_clusters,
            calib_cfg.cluster_iters,
            calib_cfg.cluster_seed,
        ]
    inputs = {"model": model_ref if isinstance(model_ref, Path) else None, "registry": registry.path}
    check_not_input(
        out,
        inputs
        | {
            "hidden offload folder": calib_cfg.hidden_offload_dir,
            "checkpoint folder": calib_cfg.checkpoint_dir,
        },
    )
    if check_out_dir(out, identity, force):
        if rank == 0:
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
    windows = {n: s.calib for n, s in samples.items()}
    Ranks(rank, world).check_items(len(batch_plan(windows, calib_cfg.batch_size)), "calibration batches")
    ckpt = None
    if calib_cfg.checkpoint_dir is not None:
        ident = checkpoint_identity(model_dir, windows, compute_dtype, calib_cfg.batch_size,
                                    calib_cfg.token_clusters, calib_cfg.cluster_iters, calib_cfg.cluster_seed)  # fmt: skip
        ckpt = LayerCheckpoint(Path(calib_cfg.checkpoint_dir), ident, world)
        ckpt.check()
    with start_ranks(device) as ranks:
        stats, info = streaming_stats(model_dir, windows, calib_cfg, ranks, compute_dtype, stop)
        cluster_stats = info.pop("cluster_stats", None)
        if ranks.is_main:
            manifest = run_manifest_base("calibration") | {
                "identity": identity,
                "model": {
                    # absolute: mine/reconstruct find it from any directory
                    "path": str(Path(model_dir).resolve()),
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
                        "split_spans": {r: v["spans"] for r, v in (samples[d.name].split or {}).items()},
                    }
                    for d in chosen
                ],
                "pass": info | {"sampling_seconds": round(t_sample, 2)},
            }
            write_calibration(out, stats, samples, manifest, force=True, clusters=cluster_stats)
            if ckpt is not None:
                ckpt.remove(made_root=False)  # the state it wrote says whether this run made the folder
    return out
