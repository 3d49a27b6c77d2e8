"""Which sparse-stage gate lets a top-1 router learn from the LM loss? Measured in one run.

For each starting MoE (a fitted router and the paper's random one) and each gate (renorm: the
softmax over the one chosen logit, i.e. weight 1 and no router gradient; straight_through; switch),
runs the same experts stage (LoRA + routers + norms, noisy top-k) for the same steps through the
trainer and prints the held-out perplexity before and after, and each gate's ratio to renorm.

    # runs/demo/moe-dive-fitted: from `dive-ds demo --groups-from domains` (the default demo fits moe-clusters)
    python benchmarks/gate_choice.py --fitted runs/demo/moe-dive-fitted --random runs/demo/moe-dive \
        --registry demo --steps 16 --out runs/gate_choice
"""

import argparse
import json
from pathlib import Path

from dive_ds.build.compare import curve, train_run
from dive_ds.build.compare_plan import CompareConfig

GATES = ("renorm", "straight_through", "switch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fitted", required=True, help="MoE with a fitted router")
    p.add_argument("--random", required=True, help="the same MoE with the paper's random router")
    p.add_argument("--registry", default="demo", help="training registry (default demo)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cfg = CompareConfig(steps=a.steps, router_steps=0, batch=a.batch, eval_every=a.steps,
                        curve_windows=a.eval_windows)  # fmt: skip
    out = Path(a.out)
    rows = {}
    for start, model in (("fitted", a.fitted), ("random", a.random)):
        for gate in GATES:
            run = train_run(f"{start}-{gate}", Path(model), 0, out, a.registry, cfg,
                            extra={"stages.experts.router_gate": gate})  # fmt: skip
            points, tok_s, _ = curve(run, cfg.batch, cfg.seq_len)
            final = json.loads((run / "model" / "config.json").read_text())["router_gate"]
            rows[(start, gate)] = (points[0]["ppl_mean"], points[-1]["ppl_mean"], tok_s, final)
    print(
        f"\nexperts stage, {a.steps} steps of {a.batch} x {cfg.seq_len} tokens; mean held-out ppl (seen domains)"
    )
    print(
        f"{'start':<8} {'gate':<18} {'before':>9} {'after':>9} {'vs renorm':>10} {'tokens/s':>9} saved gate"
    )
    for (start, gate), (b, f, t, g) in rows.items():
        ratio = f / rows[(start, "renorm")][1]
        print(f"{start:<8} {gate:<18} {b:9.2f} {f:9.2f} {ratio:10.4f} {t or 0:9.0f} {g}")
    (out / "gate_choice.json").write_text(
        json.dumps(
            {
                f"{s}/{g}": dict(zip(("before", "after", "tokens_per_s", "saved_gate"), v))
                for (s, g), v in rows.items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
