"""`dive-ds mine`: domain affinity mining. The dense model pruned with each domain's mask is evaluated on
every domain's selection windows (D x D perplexities); the affinity (build/affinity.py) clusters the
domains into N groups. Writes groups.json, mining.json, CSV matrices and heatmaps."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.cluster.hierarchy as sch
import torch

from dive_ds.build import affinity as aff
from dive_ds.build import fast_affinity as fast_aff
from dive_ds.build.affinity import as_matrix, check_names, linkage_matrix
from dive_ds.build.outputs import (
    check_not_input,
    claim_output,
    read_identity,
    run_manifest_base,
)
from dive_ds.eval.perplexity import PrunedMLP
from dive_ds.io.atomic import staged_dir, staged_file, write_json
from dive_ds.io.calibration import Calibration, check_same_model, dense_model_path, load_calibration
from dive_ds.parallel.ranks import Ranks, compute_dtype, start_ranks
from dive_ds.stats import channel_scores, kept_channels, mean_var, n_keep


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
    force: bool = False,
) -> dict | None:
    """`dive-ds mine`: domain affinity mining, then the groups and how well they recover the families
    (printed and returned by rank 0; other ranks of a torchrun launch return None).

    Domain affinity mining: D x D pruned perplexities (paper) and the fast statistics-only affinity.

    `out` is written whole (built under a temporary name, renamed into place at once); an `out`
    holding this same mining run is reused, one holding anything else is refused. The pruned models
    run on `device` in `dtype`; launched by torchrun, every rank evaluates its share of the windows,
    the sums are all-reduced and rank 0 alone writes `out` and returns the report (others: None). `force`
    (the demo, which owns its run folder): an `out` holding another mining run is replaced, the old one moved
    into `out/superseded-<time>/`."""

    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"--prune-ratio must be in [0, 1) (got {prune_ratio})")
    torch_dtype = compute_dtype(device, dtype)
    with start_ranks(device) as ranks:
        rep = _mine(calib, out, experts, prune_ratio, score, bias_compensation, fast_only, eval_windows, model,
                    batch_size, linkage, ranks, torch_dtype, force)  # fmt: skip
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


def _mine(calib_dir, out, num_groups, prune_ratio, score, bias_compensation, fast_only, eval_windows, model,
          batch_size, linkage, ranks: Ranks, torch_dtype: torch.dtype, force: bool = False) -> dict | None:  # fmt: skip
    cal = load_calibration(calib_dir)
    n_dom = len(cal.domains)
    if num_groups > n_dom:
        raise ValueError(
            f"--experts {num_groups} is larger than the {n_dom} domains; "
            f"use --experts <= {n_dom} or pass --groups FILE"
        )
    keep = n_keep(cal.stats.sum_DLF.shape[2], prune_ratio)
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"--eval-windows {eval_windows}: use >= 1 (or leave it out: all held-out windows)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: use >= 1")
    final, identity = Path(out), {
        "calibration": str(cal.path.resolve()),
        "calibration_identity": cal.manifest.get("identity"),
        "model_fingerprint": cal.fingerprint,
        "experts": num_groups, "prune_ratio": prune_ratio, "score": score, "bias_compensation": bias_compensation,
        "fast_only": fast_only, "eval_windows": None if fast_only else eval_windows, "linkage": linkage,
    }  # fmt: skip
    if torch_dtype != torch.float32 and not fast_only:  # bf16 pruned perplexities differ from fp32 ones
        identity["dtype"] = str(torch_dtype).removeprefix("torch.")
    check_not_input(final, {"calibration": cal.path})
    recorded = read_identity(final / "mining.json")
    if claim_output(final, identity, recorded, "mining.json", force=force, has_force=False):
        if ranks.is_main:
            print(f"{final} already holds this mining run; reusing it (delete it to recompute)")
        return json.loads((final / "mining.json").read_text()) if ranks.is_main else None
    evals = {n: w[:eval_windows] if eval_windows is not None else w for n, w in cal.eval.items()}
    model_dir = None
    if not fast_only:
        ranks.check_items(sum(w.shape[0] for w in evals.values()), "held-out windows (over all domains)")
        model_dir = dense_model_path(cal, model)
        check_same_model(cal, model_dir)
    ranks.barrier()  # every rank has checked `out` before rank 0 may write it
    t0 = time.time()
    pruned = None
    if not fast_only:
        pruned = pruned_perplexities(cal, model_dir, evals, keep, score, bias_compensation, batch_size, ranks,
                                     torch_dtype)  # fmt: skip
    if not ranks.is_main:
        return None
    with staged_dir(final) as out:  # the whole folder appears at once
        report = _mine_into(out, cal, identity, num_groups, keep, prune_ratio, score, fast_only, pruned, evals,
                            linkage, t0)  # fmt: skip
    return report


def pruned_perplexities(cal: Calibration, model_dir: Path, evals: dict[str, torch.Tensor], keep: int, score: str,
                        bias_compensation: bool, batch_size: int, ranks: Ranks,
                        torch_dtype: torch.dtype = torch.float32) -> np.ndarray:  # fmt: skip
    """ppl_DD[i, j]: the dense model pruned with domain i's mask, on domain j's selection windows.

    Streamed (dive_ds/eval/streamed.py): one dense decoder layer resident; while it is, all D pruned
    versions of its MLP run, each on its own carried hidden states, so the dense model is read once, not
    D times, and no rank holds it whole. Each rank evaluates its share of the windows; NLL and token sums
    are all-reduced in float64."""
    from dive_ds.eval.streamed import Variant, streamed_nll
    from dive_ds.stats import compensation_bias

    names = cal.domains
    scores = channel_scores(cal.stats, score)  # [D, L, F]
    mean, _ = mean_var(cal.stats.count_D, cal.stats.sum_DLF, cal.stats.sumsq_DLF)
    kept_DLK = [kept_channels(scores[i], keep) for i in range(len(names))]

    def pruned(i: int):
        def mlp(layer: int, dense_mlp):
            w_down = dense_mlp.down_proj.weight
            kept = kept_DLK[i][layer].to(w_down.device)
            bias = (
                compensation_bias(w_down, mean[i, layer].to(w_down.device), kept)
                if bias_compensation
                else None
            )
            return PrunedMLP(dense_mlp, kept, bias)

        return mlp

    variants = [Variant(f"pruned on {n}", mlp=pruned(i)) for i, n in enumerate(names)]
    sums = streamed_nll(model_dir, {n: evals[n] for n in names}, variants, ranks, torch_dtype, batch_size,
                        progress=sys.stderr.isatty(), desc="mine")  # fmt: skip
    ppl_DD = (sums.nll_VD / sums.tokens_D).exp()
    if ranks.is_main:
        for i, name in enumerate(names):
            print(f"  pruned on {name:<20} own ppl {ppl_DD[i, i].item():8.2f}", flush=True)
        print(f"  {len(names)} pruned models on {int(sums.tokens_D.sum())} tokens each, one pass over the dense "
              f"model: {sums.seconds:.0f}s", flush=True)  # fmt: skip
    return ppl_DD.numpy()


def _mine_into(out: Path, cal: Calibration, identity: dict, num_groups: int, keep: int, prune_ratio: float,
               score: str, fast_only: bool, ppl: np.ndarray | None, evals: dict[str, torch.Tensor],
               linkage: str, t0: float) -> dict:  # fmt: skip
    names, n_dom = cal.domains, len(cal.domains)
    scores = channel_scores(cal.stats, score)  # [D, L, F]
    report: dict = run_manifest_base("mining") | {
        "identity": identity,
        "calibration": str(cal.path),
        "domains": names,
        "families": cal.families,
        "prune_ratio": prune_ratio,
        "score": score,
        "experts": num_groups,
    }
    fast = fast_aff.jaccard_affinity(fast_aff.kept_sets(scores.numpy(), keep / scores.shape[2]))
    write_matrix_csv(out / "fast_affinity.csv", fast, names, names)
    if not fast_only:
        write_matrix_csv(out / "pruned_ppl.csv", ppl, names, names)
        affinity = aff.pearson_similarity(aff.normalise_columns(ppl))
        write_matrix_csv(out / "affinity.csv", affinity, names, names)
        cmp = fast_aff.compare_affinities(affinity, fast, num_groups, method=linkage) if n_dom > 1 else {}
        report["fast_vs_paper"] = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cmp.items()
        }
        report["pruned_eval_tokens"] = int(sum(w.numel() for w in evals.values()) * n_dom)
    else:
        affinity = fast
    report["mining_seconds"] = round(time.time() - t0, 1)
    labels = aff.cluster_domains(affinity, num_groups, method=linkage)
    groups = aff.groups_from_labels(labels, names)
    report["groups"] = groups
    report["affinity_used"] = "fast (jaccard of kept channels)" if fast_only else "paper (pruned perplexity)"
    fams = [cal.families.get(n) for n in names]
    if all(fams):
        report["family_recovery_ari"] = aff.family_recovery(labels, fams)
        report["family_recovery_ari_fast"] = aff.family_recovery(aff.cluster_domains(fast, num_groups), fams)
    if n_dom > 1:
        plot_affinity(
            affinity,
            names,
            labels,
            out / "affinity.png",
            f"domain affinity ({report['affinity_used']}), {num_groups} groups",
        )
        plot_affinity(
            fast,
            names,
            aff.cluster_domains(fast, num_groups),
            out / "fast_affinity.png",
            f"fast affinity (kept-channel Jaccard), {num_groups} groups",
        )
    write_json(out / "mining.json", report)
    write_json(out / "groups.json", groups)
    return report


# --------------------------------------------------------------------------- plotting


def plot_side_inches(n_domains: int) -> float:
    """Side of the (square) affinity figure in inches: max(6, 3 + 0.4 * D)."""
    return max(6.0, 3.0 + 0.4 * n_domains)


def plot_affinity(
    S_DD, domain_names: Sequence[str], labels_D, path, title: str, method: str = "average", dpi: int = 100
) -> Path:
    """Write a PNG: dendrogram of 1 - S on top of a heatmap of S in dendrogram leaf order.

    The heatmap has a colour bar, domain names as tick labels, a coloured strip with each
    domain's group (`labels_D`, may be None) and white lines where consecutive leaves
    change group (groups from another affinity need not be contiguous in this order).
    The figure is square, plot_side_inches(D) inches at `dpi`. Written atomically (temp
    file in the same folder, then os.replace). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    S = as_matrix(S_DD, "similarity matrix")
    names = check_names(domain_names)
    D = S.shape[0]
    if len(names) != D:
        raise ValueError(f"{len(names)} domain names for a {D} x {D} matrix")
    labels = None if labels_D is None else np.asarray(labels_D).reshape(-1)
    if labels is not None and len(labels) != D:
        raise ValueError(f"{len(labels)} labels for {D} domains")
    Z = linkage_matrix(S, method)
    order = np.asarray(sch.leaves_list(Z))

    side = plot_side_inches(D)
    fig = Figure(figsize=(side, side), dpi=dpi)
    FigureCanvasAgg(fig)
    # Margins sized for the longest name at 8 pt (~0.07 in per character).
    margin = min(0.4, (0.3 + 0.07 * max(len(n) for n in names)) / side)
    gs = fig.add_gridspec(
        2,
        3,
        height_ratios=[1.0, 4.0],
        width_ratios=[4.0, 0.18, 0.15],
        left=margin,
        bottom=margin,
        right=0.9,
        top=0.92,
        wspace=0.06,
        hspace=0.02,
    )
    ax_dend = fig.add_subplot(gs[0, 0])
    ax_heat = fig.add_subplot(gs[1, 0])
    ax_strip = fig.add_subplot(gs[1, 1], sharey=ax_heat)
    ax_cbar = fig.add_subplot(gs[1, 2])

    sch.dendrogram(Z, ax=ax_dend, orientation="top", no_labels=True, link_color_func=lambda _: "k")
    ax_dend.set_xlim(0, 10 * D)  # scipy puts leaf i at x = 10 i + 5
    ax_dend.set_xticks([])
    ax_dend.set_ylabel("1 - S", fontsize=8)
    ax_dend.tick_params(labelsize=7)
    for spine in ("top", "right"):
        ax_dend.spines[spine].set_visible(False)

    S_ord = S[np.ix_(order, order)]
    im = ax_heat.imshow(S_ord, cmap="viridis", aspect="auto", interpolation="nearest")
    ax_heat.set_xticks(range(D), [names[i] for i in order], rotation=90, fontsize=8)
    ax_heat.set_yticks(range(D), [names[i] for i in order], fontsize=8)
    if D <= 16:
        lo, hi = float(S_ord.min()), float(S_ord.max())
        mid = 0.5 * (lo + hi)
        for r in range(D):
            for c in range(D):
                ax_heat.text(
                    c,
                    r,
                    f"{S_ord[r, c]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if S_ord[r, c] > mid else "white",
                )
    fig.colorbar(im, cax=ax_cbar)
    ax_cbar.tick_params(labelsize=7)

    if labels is not None:
        _, code_D = np.unique(labels, return_inverse=True)
        lab_ord = code_D.reshape(-1)[order]  # colour codes; the text shows the caller's label
        ax_strip.imshow(
            lab_ord[:, None] % 20, cmap="tab20", vmin=-0.5, vmax=19.5, aspect="auto", interpolation="nearest"
        )
        for r, i in enumerate(order):
            ax_strip.text(0, r, str(labels[i]), ha="center", va="center", fontsize=7)
        for i in np.flatnonzero(lab_ord[1:] != lab_ord[:-1]) + 1:
            ax_heat.axhline(i - 0.5, color="white", lw=2)
            ax_heat.axvline(i - 0.5, color="white", lw=2)
    ax_strip.set_xticks([0], ["group"], rotation=90, fontsize=8)
    ax_strip.tick_params(axis="y", left=False, labelleft=False)
    fig.suptitle(title, fontsize=10)

    path = Path(path)
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


# ----------------------------------------------------------------------------- writers


def write_matrix_csv(path, M, row_names: Sequence[str], col_names: Sequence[str]) -> Path:
    """Write a labelled matrix as CSV (atomic): header "", col names; one row per name.

    Values are written with repr (round-trips float64 exactly; nan/inf allowed).
    """
    M = np.asarray(M, dtype=np.float64)
    rows, cols = check_names(row_names, "row_names"), check_names(col_names, "col_names")
    if M.shape != (len(rows), len(cols)):
        raise ValueError(
            f"matrix shape {M.shape} does not match {len(rows)} row and {len(cols)} column names"
        )
    path = Path(path)
    with staged_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *cols])
        for name, row in zip(rows, M):
            w.writerow([name, *(repr(float(v)) for v in row)])
    return path


def read_matrix_csv(path) -> tuple[np.ndarray, list[str], list[str]]:
    """Read a CSV written by write_matrix_csv: (M [R, C] float64, row_names, col_names)."""
    path = Path(path)
    with open(path, newline="") as f:
        table = [r for r in csv.reader(f) if r]
    if not table:
        raise ValueError(f"{path} is empty")
    cols = table[0][1:]
    rows, values = [], []
    for n, r in enumerate(table[1:], start=2):
        if len(r) != len(cols) + 1:
            raise ValueError(f"{path} line {n}: {len(r)} fields, expected {len(cols) + 1}")
        rows.append(r[0])
        try:
            values.append([float(v) for v in r[1:]])
        except ValueError as e:
            raise ValueError(f"{path} line {n}: {e}") from None
    M = np.asarray(values, dtype=np.float64).reshape(len(rows), len(cols))
    return M, rows, cols
