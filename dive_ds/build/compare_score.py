"""How `dive-ds compare` scores a model: per-window NLL on every window set, the LAMBADA-style items,
the evaluation windows and items themselves, and what a model folder says of its size."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def score_all(model_dir: Path, windows: dict[str, dict[str, torch.Tensor]], items: list[dict] | None,
              oracle: bool = False) -> dict:  # fmt: skip
    """score() of every window set, and the LAMBADA-style items as the set `lambada` (one model load)."""
    from dive_ds.io.loading import load_causal_lm, load_tokenizer

    m = load_causal_lm(model_dir, dtype=torch.float32).eval()
    out = {k: score(m, model_dir, w, oracle=oracle) for k, w in windows.items()}
    if items:
        out["lambada"] = score_lambada(m, load_tokenizer(model_dir), items)
    return out


def score_lambada(m, tok, items: list[dict]) -> dict:
    """Accuracy and target-word perplexity, shaped like a window set of one domain whose 'windows' are the
    items (nll = the target word's summed NLL, one 'token' each): the paired intervals then apply as they are."""
    from dive_ds.eval.lambada import lambada_scores

    r = lambada_scores(m, tok, items)
    nll = [float(x) for x in r["nll"]]
    return {"nll": {"router": {"lambada": nll}}, "tokens_per_window": {"lambada": 1}, "router": {"lambada": r["ppl"]},
            "router_mean": r["ppl"], "router_tokens": r["ppl"], "acc": r["acc"], "acc_ci95": r["acc_ci95"],
            "n": r["n"], "correct": r["correct"]}  # fmt: skip


def score(m, model_dir: Path, windows: dict[str, torch.Tensor], oracle: bool = False) -> dict:
    """Per-window NLL of every domain (router routing, and oracle routing for a MoE with groups), summarised."""
    from dive_ds.build.evaluate import oracle_map
    from dive_ds.eval.paired import per_window_nll, summarise

    tpw = {d: int(w.shape[1] - 1) for d, w in windows.items()}
    res = {
        "nll": {"router": {d: per_window_nll(m, w, 4) for d, w in windows.items()}},
        "tokens_per_window": tpw,
    }
    if oracle:
        mapping = oracle_map(model_dir, list(windows))
        if mapping is not None:
            res["nll"]["oracle"] = {
                d: per_window_nll(m, w, 4, route_to=mapping[d]) for d, w in windows.items()
            }
    for key, nll in res["nll"].items():
        s = summarise(nll, tpw)
        res[key], res[f"{key}_mean"], res[f"{key}_tokens"] = s["ppl"], s["ppl_mean"], s["ppl_tokens"]
    return res


def eval_sets(registry: str, model_dir: Path, n: int, seq_len: int, split) -> tuple[dict, dict]:
    """Windows spread over every registry domain's evaluation set, and the span ids they came from."""
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.sampler import eval_chars_budget, evaluation_windows
    from dive_ds.io.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    windows, ids = {}, {}
    for d in load_registry(registry).domains.values():
        windows[d.name], ids[d.name] = evaluation_windows(
            d.name,
            list(iter_documents(d, eval_chars_budget(n, seq_len, split, d.source.type))),
            tok,
            n,
            seq_len,
            split,
        )
    return windows, ids


def lambada_items(n: int | None, split, calibrated: list[str]) -> list[dict] | None:
    """The LAMBADA-style items of the comparison's split (None: off, or their domains were calibrated on)."""
    if n is None:
        return None
    from dive_ds.eval.lambada import LambadaConfig, load_items

    lc = LambadaConfig(split=split, max_items=n or None)
    if set(lc.domains) & set(calibrated):
        print(
            f"[compare] LAMBADA-style task skipped: its domains {lc.domains} were calibrated on", flush=True
        )
        return None
    return load_items(lc)


def widths_of(model_dir: Path) -> list[int] | int | dict:
    """The expert width (per layer, for adaptive FLAP) the model was built with; with a shared expert
    {"routed": w, "shared": s} (a top-1 token runs both)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    routed = cfg.get("expert_intermediate_sizes") or cfg["expert_intermediate_size"]
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return {"routed": routed, "shared": shared} if shared else routed


def params_of(model_dir: Path) -> dict:
    from transformers import AutoConfig

    from dive_ds.models.moe import count_parameters

    return count_parameters(AutoConfig.from_pretrained(model_dir))


def eqtrain_rank(flap_dir: Path, target: int) -> int:
    """The smallest LoRA rank at which FLAP trains at least `target` parameters in the experts stage."""
    from transformers import AutoConfig

    from dive_ds.models.lora import lora_rank_for_trainable

    return lora_rank_for_trainable(AutoConfig.from_pretrained(flap_dir), target)
