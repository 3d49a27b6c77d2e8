"""The pipeline steps that `dive-ds` and the demo run alike: calibrate and mine with their printed
summaries, the reconstruction settings, and the one-line error message.

The CLI (dive_ds/cli.py) turns flags into these calls; dive_ds/demo.py calls them directly.
"""

from __future__ import annotations

from pathlib import Path

# The embedded default: small enough for a 2-core laptop (the reference recipe is 1024 x 256).
DEMO = {
    "model": "demo",
    "domains": "demo",
    "samples_per_domain": 16,  # = `dive-ds demo`; math_problems (32k characters) has ~4.7k calibration-set tokens
    "seq_len": 256,
    "eval_windows": 4,  # selection windows; math_problems' selection set holds 5
    "out": "runs/demo",
}


def error_message(e: BaseException) -> str:
    """The first line of an error, for `dive-ds: error: ...` (an OSError: the path and what went wrong)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        hint = {
            "FileNotFoundError": "check the path",
            "NotADirectoryError": "a folder was expected; choose another path",
            "IsADirectoryError": "a file was expected; choose another path",
            "FileExistsError": "choose another path",
            "PermissionError": "check its permissions",
        }.get(type(e).__name__, "check the path and the disk")
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return f"{where}: {e.strerror}; {hint}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
):
    """`dive-ds calibrate`: one streaming pass, then the summary table (rank 0). With `demo`, DEMO fills
    what is not given. `stop`: a threading.Event that stops the pass at the next layer boundary."""
    from dive_ds.calibrate import CalibConfig, run_calibration
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


def mine(
    calib: str,
    out: str,
    experts: int,
    prune_ratio: float = 0.5,
    score: str = "wifv",
    bias_compensation: bool = True,
    fast_only: bool = False,
    eval_windows: int | None = None,
    model: str | None = None,
    batch_size: int = 8,
    linkage: str = "average",
    device: str = "auto",
    dtype: str = "fp32",
) -> dict | None:
    """`dive-ds mine`: domain affinity mining, then the groups and how well they recover the families
    (printed and returned by rank 0; other ranks of a torchrun launch return None)."""
    from dive_ds.workflows import run_mine

    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"--prune-ratio must be in [0, 1) (got {prune_ratio})")
    rep = run_mine(
        calib,
        out,
        experts,
        prune_ratio,
        score,
        bias_compensation,
        fast_only,
        eval_windows,
        model,
        batch_size,
        linkage,
        device,
        dtype,
    )
    if rep is not None:
        _print_mining(rep, out)
    return rep


def _print_mining(rep: dict, out) -> None:
    print(f"\nmining ({rep['affinity_used']}, {rep['mining_seconds']}s) -> {out}/groups.json")
    for g, members in rep["groups"].items():
        print(f"  {g}: {', '.join(members)}")
    if "family_recovery_ari" in rep:
        print(
            f"  family recovery (ARI vs source families): {rep['family_recovery_ari']:.3f} "
            f"(fast affinity: {rep['family_recovery_ari_fast']:.3f})"
        )
    if rep.get("fast_vs_paper"):
        c = rep["fast_vs_paper"]
        print(
            f"  fast vs paper affinity: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}, "
            f"ARI of groupings {c['ari']:.3f}"
        )


def reconstruct_config(
    preset: str | None = None,
    experts: int | None = None,
    top_k: int | None = None,
    prune_ratio: float | None = None,
    method: str = "dive",
    score: str = "wifv",
    bias_compensation: bool = True,
    router_init: str = "random",
    seed: int = 42,
):
    """`dive-ds reconstruct`'s settings: the preset (or N=8, k=1, r=0.5), then the given values, then the method's."""
    from dive_ds.reconstruct import PRESETS, ReconstructConfig

    base = dict(PRESETS[preset]) if preset else {"num_experts": 8, "top_k": 1, "prune_ratio": 0.5}
    for value, key in ((experts, "num_experts"), (top_k, "top_k"), (prune_ratio, "prune_ratio")):
        if value is not None:
            base[key] = value
    if method in ("flap", "flap-adaptive"):
        base.update(num_experts=1, top_k=1)
    if method == "llama-moe" and prune_ratio is None:  # N disjoint experts of F/N channels
        base["prune_ratio"] = 1 - 1 / base["num_experts"]
    if method == "upcycle":
        base["prune_ratio"] = 0.0
    return ReconstructConfig(
        score=score,
        bias_compensation=bias_compensation,
        router_init=router_init,
        seed=seed,
        method=method,
        **base,
    )
