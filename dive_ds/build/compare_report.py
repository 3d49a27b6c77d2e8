"""What `dive-ds compare` reports: paired ratios with intervals, the tables, the curve plot, and the
README block generated from compare.json (`dive-ds compare-report`). Pure functions of the JSON.

A ratio a/b is of token-weighted perplexities on identical windows, with a paired bootstrap
interval over windows (dive_ds.eval.paired). Before training a ratio compares two models; after
training, two runs of the same data seed. Where a side has several seeds (grouping seeds of the
seeded baselines, data seeds of every run) each pair is computed and the table shows the mean
ratio, the spread over seeds and the widest interval.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dive_ds.build.compare_plan import is_dive

SPLITS = ("seen", "unseen", "lambada")
"""Window sets; `lambada` is the LAMBADA-style task, one item per 'window' (target-word NLL)."""
DENSE = ("flap", "flap-adaptive", "flap-eqtrain")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
HEAD_BEGIN, HEAD_END = "<!-- compare-headline:begin -->", "<!-- compare-headline:end -->"
"""The README's short block: the headline ratio table only (the full tables go between BEGIN and END)."""


def _nll(entry: dict, split: str) -> dict | None:
    return entry.get(split, {}).get("nll", {}).get("router")


def _sides(results: dict, when: str, split: str) -> list[tuple[str, str, str, int | None, dict, dict]]:
    """(name, method, treatment, data seed, nll, scored entry) of every model (before) or run (after)."""
    out = []
    if when == "before":
        for name, m in results.get("models", {}).items():
            e = m["before"].get(split)
            if e is not None and m["method"] != "flap-eqtrain":
                out.append((name, m["method"], m["treatment"], None, e["nll"]["router"], e))
    else:
        for name, r in results.get("runs", {}).items():
            e = r["after"].get(split)
            if e is not None:
                out.append((name, r["method"], r["treatment"], r["data_seed"], e["nll"]["router"], e))
    return out


def pair_rows(results: dict, n_boot: int) -> list[dict]:
    """Every DIVE model/run against every baseline of its data seed, and against the stronger FLAP.
    Intervals: a cluster bootstrap (windows of one document, items of one segment, move together)."""
    from dive_ds.eval.paired import paired_ratio

    rows = []
    for when in ("before", "after"):
        for split in SPLITS:
            sides = _sides(results, when, split)
            cl = results.get("clusters", {}).get(split)
            for a in (s for s in sides if is_dive(s[1])):  # DIVE and its variants, each against the baselines
                others = [b for b in sides if not is_dive(b[1]) and b[3] == a[3]]
                if a[1] != "dive":  # a variant against DIVE itself (same data seed and router treatment)
                    others += [b for b in sides if b[1] == "dive" and b[3] == a[3] and b[2] == a[2]]
                flaps = [b for b in others if b[1] in ("flap", "flap-adaptive")]
                for b in others:
                    if b[1] not in DENSE and b[2] != a[2]:
                        continue  # seeded baselines: compared under the same router treatment
                    label = b[1]
                    res = paired_ratio(a[4], b[4], a[5]["tokens_per_window"], n_boot, clusters=cl)
                    rows.append(_row(a, b, label, when, split, res))
                if flaps:  # the stronger of the two FLAPs on these windows (favours the baseline)
                    b = min(flaps, key=lambda s: s[5]["router_tokens"])
                    res = paired_ratio(a[4], b[4], a[5]["tokens_per_window"], n_boot, clusters=cl)
                    rows.append(_row(a, b, "stronger FLAP", when, split, res))
    return rows


def _row(a, b, label, when, split, res) -> dict:
    return {"when": when, "split": split, "a": a[0], "a_method": a[1], "a_treatment": a[2], "b": b[0], "vs": label,
            "data_seed": a[3]} | res  # fmt: skip


def summary_rows(rows: list[dict]) -> list[dict]:
    """Rows grouped by (a's treatment, baseline, when, split): the geometric mean ratio over the pairs
    (seeds), its spread, and a hierarchical interval (a random pair per resample: seed and window spread)."""
    from dive_ds.eval.paired import pooled_interval

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r.get("a_method", "dive"), r["a_treatment"], r["vs"], r["when"], r["split"])
        groups.setdefault(key, []).append(r)
    out = []
    for (method, treat, vs, when, split), rs in groups.items():
        ratios = [r["ratio"] for r in rs]
        lo, hi = pooled_interval([r["boot"] for r in rs]) if len(rs) > 1 else (rs[0]["lo"], rs[0]["hi"])
        out.append({"a": f"{method}-{treat}", "vs": vs, "when": when, "split": split, "pairs": len(rs),
                    "ratio": float(np.exp(np.mean(np.log(ratios)))), "min": min(ratios), "max": max(ratios),
                    "lo": lo, "hi": hi})  # fmt: skip
    return out


def finish(results: dict, n_boot: int) -> None:
    rows = pair_rows(results, n_boot)
    results["ratio_summary"] = summary_rows(rows)
    results["ratios"] = [{k: v for k, v in r.items() if k != "boot"} for r in rows]


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if not math.isfinite(x) else (f"{x:.1f}" if x < 1000 else f"{x:.3g}")


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    spread = f" (n={s['pairs']}: {s['min']:.3f}-{s['max']:.3f})" if s["pairs"] > 1 else ""
    return f"{s['ratio']:.3f}{spread} [{s['lo']:.3f}, {s['hi']:.3f}]"


def headline_table(results: dict) -> str:
    summ = results.get("ratio_summary", [])
    keys = sorted({(s["a"], s["vs"]) for s in summ}, key=lambda k: (k[0], k[1] != "stronger FLAP", k[1]))
    cols = [(w, sp) for sp in SPLITS for w in ("before", "after")]
    lines = [
        "| DIVE | vs | " + " | ".join(f"{sp}, {w}" for w, sp in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for a, vs in keys:
        find = {(s["when"], s["split"]): s for s in summ if (s["a"], s["vs"]) == (a, vs)}
        lines.append(f"| {a} | {vs} | " + " | ".join(_cell(find.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _ppl_table(entries: list[tuple[str, dict, dict]], split: str) -> list[str]:
    first = next((e for _, e, _ in entries if split in e), None)
    if first is None:
        return []
    domains = list(first[split]["router"])
    lines = ["| model | routing | token-weighted | mean of domains | " + " | ".join(domains)
             + " | total | activated | trainable |", "|---" * (len(domains) + 7) + "|"]  # fmt: skip
    for name, e, info in entries:
        if split not in e:
            continue
        for key in ("router", "oracle"):
            if key in e[split]:
                p = info.get("params", {})
                tr = info.get("trainable")
                lines.append(f"| {name} | {key} | {_fmt(e[split][key + '_tokens'])} | {_fmt(e[split][key + '_mean'])} | "
                             + " | ".join(_fmt(e[split][key][d]) for d in domains)
                             + f" | {_m(p.get('total'))} | {_m(p.get('activated'))} | {_m(tr)} |")  # fmt: skip
    return lines


def _m(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def markdown(results: dict) -> str:
    cfg = results["config"]
    toks = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    lines = [f"# Equal-budget comparison ({toks} training tokens per run)\n"]
    if not results.get("complete", True):
        lines.append(f"(in progress: {len(results['runs'])} training runs done)\n")
    lines.append(
        f"Made by commit `{results.get('commit')}` with `{' '.join(results.get('command') or [])}`.\n"
    )
    lines.append(
        "## Token-weighted perplexity ratios, paired 95% bootstrap intervals (documents resampled within domains)\n"
    )
    lines.append(headline_table(results))
    models = results.get("models", {})
    runs = results.get("runs", {})
    for split in ("seen", "unseen"):
        before = [(n, m["before"], m) for n, m in models.items()]
        after = [
            (n, r["after"], r | {"params": models.get(r["model"], {}).get("params", {})})
            for n, r in runs.items()
        ]
        for title, entries in (("before any training", before), (f"after {toks} tokens", after)):
            table = _ppl_table(entries, split)
            if table:
                lines.append(f"\n## {split} domains, {title}: evaluation-set perplexity\n")
                lines += table
    acc = [(n, m["before"]["lambada"]) for n, m in models.items() if "lambada" in m["before"]]
    acc += [(n, r["after"]["lambada"]) for n, r in runs.items() if "lambada" in r["after"]]
    if acc:
        lines.append(
            "\n## LAMBADA-style task (unseen narrative text, evaluation set): accuracy [95% Wilson]\n"
        )
        lines += ["| model or run | items | accuracy | target-word ppl |", "|---|---|---|---|"]
        for name, e in acc:
            lo, hi = e["acc_ci95"]
            lines.append(
                f"| {name} | {e['n']} | {e['acc']:.3f} [{lo:.3f}, {hi:.3f}] | {_fmt(e['router_tokens'])} |"
            )
    lines.append("\n## training speed (same trainer, same batch)\n")
    lines += ["| run | median tokens/s | LoRA rank |", "|---|---|---|"]
    for name, r in runs.items():
        rate = r["train_tokens_per_s"]
        lines.append(
            f"| {name} | {'-' if rate is None else f'{rate:.0f}'} | {r.get('lora_r') or 'default'} |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: dict, path: Path) -> None:
    from dive_ds.io.atomic import write_text

    write_text(path, markdown(results))


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["runs"].items():
        pts = r["curve"]
        if pts:
            ax.plot([p["tokens"] for p in pts], [p.get("ppl_tokens", p["ppl_mean"]) for p in pts], marker="o",
                    label=name)  # fmt: skip
    ax.set_xlabel("training tokens")
    ax.set_ylabel("token-weighted perplexity (seen domains, evaluation set)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("equal-budget retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_block(results: dict, source: str) -> str:
    """The README's comparison section body, generated from compare.json (never edited by hand)."""
    return (
        f"{BEGIN}\n<!-- generated by `dive-ds compare-report --json {source} --readme README.md`; do not edit -->\n"
        + markdown(results)
        + f"{END}"
    )


def headline_block(results: dict, source: str, readme: str) -> str:
    """The short block: commit, command and the headline ratio table."""
    cfg = results["config"]
    toks = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    state = (
        "" if results.get("complete", True) else f" (in progress: {len(results['runs'])} training runs done)"
    )
    return (
        f"{HEAD_BEGIN}\n<!-- generated by `dive-ds compare-report --json {source} --readme {readme}`; do not "
        f"edit -->\n{toks} training tokens per run{state}. Made by commit `{results.get('commit')}` with "
        f"`{' '.join(results.get('command') or [])}`.\n\n" + headline_table(results) + f"{HEAD_END}"
    )


def _replace(text: str, begin: str, end: str, block: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def update_readme(readme: Path, results: dict, source: str) -> None:
    """Replace the blocks between the compare markers of `readme`: the full tables (compare:begin/end) and/or
    the headline table (compare-headline:begin/end); one-line error if it has neither."""
    text = readme.read_text()
    full, short = BEGIN in text and END in text, HEAD_BEGIN in text and HEAD_END in text
    if not (full or short):
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block; add the two markers where the tables go")
    if full:
        text = _replace(text, BEGIN, END, readme_block(results, source))
    if short:
        text = _replace(text, HEAD_BEGIN, HEAD_END, headline_block(results, source, str(readme)))
    from dive_ds.io.atomic import write_text

    write_text(readme, text)
