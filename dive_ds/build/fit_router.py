"""`dive-ds fit-router`: fit every router from the dense model (build/router_pass.py) and write the
fitted MoE as a new folder beside the input, sharing its unchanged files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dive_ds.build.outputs import check_new_out
from dive_ds.build.router_pass import FIT_FILE
from dive_ds.io.atomic import check_free_space, link_or_copy, staged_dir
from dive_ds.io.calibration import check_same_model, load_calibration
from dive_ds.io.fingerprint import folder_fingerprint
from dive_ds.parallel.ranks import Ranks, compute_dtype, start_ranks


def run_fit_router(
    moe: str | Path,
    calib_dir: str | Path,
    out: str | Path,
    cfg=None,
    dense: str | Path | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict:
    """Fit every router of a dive_moe folder (HF or sharded) from the dense model; write the result to `out`.

    The resident layer runs on `device` in `dtype`; launched by torchrun, every rank carries its share of
    the calibration windows and the fit runs on all of them from all-reduced sums; rank 0 alone writes `out`."""
    torch_dtype = compute_dtype(device, dtype)
    with start_ranks(device) as ranks:
        return _fit_router(moe, calib_dir, out, cfg, dense, ranks, torch_dtype)


def _moe_source_fingerprint(moe: Path) -> str | None:
    """The fingerprint of the dense model a dive_moe folder was reconstructed from (None: not recorded)."""
    try:
        info = json.loads((moe / "dive_experts.json").read_text())
    except (OSError, ValueError):
        return None
    ident = info.get("identity") if isinstance(info, dict) else None
    return ident.get("dense_model_fingerprint") if isinstance(ident, dict) else None


def _fit_router(moe, calib_dir, out, cfg, dense, ranks: Ranks, torch_dtype: torch.dtype) -> dict:
    from dive_ds.build.router_config import RouterFitConfig
    from dive_ds.build.router_pass import fit_routers
    from dive_ds.io.layers import MoeLayers

    cfg = cfg or RouterFitConfig()
    out, moe = Path(out), Path(moe)
    check_new_out(out)
    if out.resolve() == moe.resolve():
        raise ValueError(f"--out {out} is the input folder; choose a new --out (the input is never modified)")
    cal = load_calibration(calib_dir)
    layers = MoeLayers(moe)
    dense_dir = Path(dense) if dense is not None else Path(cal.manifest["model"]["path"])
    check_same_model(cal, dense_dir)
    c = layers.config
    if (c.num_hidden_layers, c.hidden_size) != (
        cal.stats.sum_DLF.shape[1],
        cal.stats.mlp_in_sum_DLH.shape[2],
    ):
        raise ValueError(
            f"{moe} has {c.num_hidden_layers} layers x hidden {c.hidden_size} but the calibration in {cal.path} "
            "is of another model; pass the calibration the MoE was reconstructed from"
        )
    made_from = _moe_source_fingerprint(moe)
    if made_from is not None and made_from != cal.fingerprint:
        raise ValueError(
            f"{moe} was reconstructed from another model (fingerprint {made_from}) than the one {cal.path} "
            f"calibrated ({cal.fingerprint}); pass the calibration the MoE was reconstructed from"
        )
    top = max(int(w.max()) for w in cal.calib.values())
    if top >= c.vocab_size:
        raise ValueError(
            f"the calibration in {cal.path} holds token id {top} but {moe} has a vocabulary of {c.vocab_size}: "
            "another tokenizer; pass a calibration made with this model's tokenizer"
        )
    n_win = sum(min(w.shape[0], cfg.windows_per_domain or w.shape[0]) for w in cal.calib.values())
    ranks.check_items(n_win, "calibration windows (over all domains)")
    # before the fit, not after it (the files holding a router are written anew); on every rank, so that
    # every rank stops, not rank 0 alone
    check_free_space(out, rewritten_bytes(moe), "the fitted MoE at --out")
    ranks.barrier()  # every rank has checked `out` before rank 0 may write it
    routers, report = fit_routers(moe, dense_dir, cal.calib, cfg, ranks=ranks, dtype=torch_dtype)
    report |= {
        "moe": str(moe.resolve()),
        "calibration": str(cal.path.resolve()),
        "calibration_fingerprint": folder_fingerprint(cal.path),
        "dense_model": str(Path(dense_dir).resolve()),
    }
    calib_rate = cal.manifest.get("pass", {}).get("tokens_per_s")
    if calib_rate:
        report["calibration_tokens_per_s"] = calib_rate
    if not ranks.is_main:
        return report
    write_fitted(moe, out, routers, report)
    print(
        f"fitted {len(routers)} routers ({report['target']} targets) on {report['fit_tokens']} tokens in "
        f"{report['seconds']}s ({report['tokens_per_s']} tokens/s; calibration pass: {calib_rate} tokens/s); "
        f"held-out label accuracy {report['mean_label_accuracy_heldout']:.3f}, "
        f"routed error / best {report['mean_excess_error_heldout']:.3f} -> {out}",
        flush=True,
    )
    return report


# --------------------------------------------------------------------------- writing the fitted folder


def rewritten_bytes(moe_dir: str | Path) -> int:
    """Bytes `write_fitted` writes anew: the safetensors files that hold a router (the rest are linked)."""
    total = 0
    for path in Path(moe_dir).rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            if any(".mlp.gate." in k for k in f.keys()):
                total += path.stat().st_size
    return total


def write_fitted(
    moe_dir: str | Path, out: str | Path, routers: dict[int, dict[str, torch.Tensor]], report: dict
) -> Path:
    """A copy of `moe_dir` at `out` whose routers are `routers` (atomic; the input is never modified).

    Files without a router tensor are hard-linked (copied across file systems); files holding one
    are rewritten as new files. `router_fit.json` records the fit.
    """
    src, out = Path(moe_dir), Path(out)
    updates = {
        f"model.layers.{layer}.mlp.{k}": v.contiguous() for layer, d in routers.items() for k, v in d.items()
    }
    with staged_dir(out) as tmp:
        found: set[str] = set()
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() or rel.name.startswith(".") or rel.name == FIT_FILE:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    keys = set(f.keys())
                    meta = f.metadata()
                hit = keys & updates.keys()
                if hit:
                    tensors = load_file(path)
                    for k in hit:
                        tensors[k] = updates[k].to(tensors[k].dtype)
                    save_file(tensors, tmp / rel, metadata=meta)
                    found |= hit
                    continue
            link_or_copy(path, tmp / rel)
        missing = sorted(set(updates) - found)
        if missing:
            raise ValueError(
                f"{src} holds no tensor {missing[0]} (and {len(missing) - 1} more); not a dive_moe folder"
            )
        (tmp / FIT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            raise ValueError(f"--out {out} appeared while fitting; choose another --out")
    return out
