"""The experts-stage training step, MoE against FLAP at equal activated width, measured in one run.

    .venv/bin/python benchmarks/moe_step.py --moe runs/demo/moe-clusters-fitted --flap runs/demo/moe-flap [--steps 6]

(stop 29 measured it on the DIVE MoE: `moe-dive-fitted` of `dive-ds demo --groups-from domains`)

Both models go through the trainer's own stage preparation (`prepare_stage_model` with the experts
stage of configs/demo_retrain.yaml: sparse noisy top-k routing, LoRA on the experts, routers and
norms trainable), then take --steps forward + backward + AdamW steps on the same random token batches
(--batch x --seq-len), alternating model by model so both see the machine in the same state. Prints
the median step time of each (first step dropped), their ratio, and the MoE step's own time by kind of
work and the operators whose time grows most (torch.profiler, self CPU time; the experts' matmuls, base
and LoRA, run inside torch._grouped_mm as one aten::mm per expert on a CPU). With --trainer it also runs the trainer itself (launchers/retrain.py, ZeRO-2, 1 rank, the same experts
stage) on each model for --steps steps and prints the median `step_time_s` of each and their ratio: the
trainer's tokens/s, DeepSpeed's engine included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

KINDS = {  # profiler op name -> kind (the rest: "attention, embeddings, norms, LM head, optimizer")
    "aten::_grouped_mm": "experts: grouped matmuls (base + LoRA)",
    "aten::argsort": "sort and permute",
    "aten::sort": "sort and permute",
    "aten::index_select": "sort and permute",
    "aten::index_copy": "sort and permute",
    "aten::index_add_": "sort and permute",
    "aten::scatter_add_": "sort and permute",
    "aten::repeat_interleave": "sort and permute",
    "aten::topk": "router",
    "aten::softplus": "router",
    "aten::softplus_backward": "router",
    "aten::normal_": "router",
}


def _model(path: str, stage, seed: int):
    from transformers import AutoModelForCausalLM

    import dive_ds  # noqa: F401  (registers dive_moe)
    from dive_ds.train.trainable import prepare_stage_model

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    counts = prepare_stage_model(model, stage, seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt, counts


def _step(model, opt, ids) -> None:
    from dive_ds.train.evaluation import causal_lm_loss

    loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trainer_step(model: str, steps: int, batch: int, seq_len: int, root: Path) -> float:
    """Median step time (first step dropped) of the experts stage run by launchers/retrain.py."""
    import yaml

    out = root / Path(model).name
    cfg = root / f"{Path(model).name}.yaml"
    base = yaml.safe_load((REPO / "configs" / "demo_retrain.yaml").read_text())
    base.update(
        out_dir=str(out),
        model={"path": str(Path(model).resolve())},
        checkpoint={"every": 0, "keep": 1},
        eval={"every": 0, "at_start": False, "windows_per_domain": 1, "batch_size": 1},
        logging={"every": 1, "heatmap_every": 0, "progress": False},
    )
    base["data"]["seq_len"] = seq_len
    base["train"]["global_batch_size"] = batch
    base["stages"] = {
        "router": {"enabled": False, "steps": 1},
        "experts": base["stages"]["experts"] | {"steps": steps},
    }
    cfg.write_text(yaml.safe_dump(base))
    cmd = [sys.executable, str(REPO / "launchers" / "retrain.py"), "--deepspeed",
           str(REPO / "ds_configs" / "zero2.json"), "--config", str(cfg)]  # fmt: skip
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"retrain on {model} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["step_time_s"] for r in rows if "step_time_s" in r][1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", required=True, help="a dive_moe folder (N experts)")
    p.add_argument("--flap", required=True, help="the FLAP model of the same calibration (1 expert)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--trainer", action="store_true", help="also time the trainer (launchers/retrain.py) on each"
    )
    a = p.parse_args()
    from dive_ds.train.config_load import load_run_config

    run = load_run_config(REPO / "configs" / "demo_retrain.yaml")
    stage = next(s for s in run.stages if s.name == "experts")
    models = {name: _model(path, stage, run.train.seed) for name, path in (("moe", a.moe), ("flap", a.flap))}
    for name, (model, _, counts) in models.items():
        cfg = model.config
        print(f"{name}: {cfg.num_local_experts} expert(s) x {cfg.expert_intermediate_size} channels, "
              f"top-{cfg.num_experts_per_tok}; trainable {counts['trainable']:,}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    vocab = models["moe"][0].config.vocab_size
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq_len), generator=g)
        for name, (model, opt, _) in models.items():
            t0 = time.perf_counter()
            _step(model, opt, ids)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t[1:]) for n, t in times.items()}
    tokens = a.batch * a.seq_len
    for n, t in med.items():
        print(f"{n:>4} step: {t * 1e3:8.1f} ms median of {a.steps - 1} ({tokens / t:6.1f} tokens/s)")
    print(f"MoE / FLAP step time: {med['moe'] / med['flap']:.3f}")

    if a.trainer:
        root = Path(tempfile.mkdtemp(prefix="moe_step_"))
        got = {
            n: _trainer_step(path, a.steps, a.batch, a.seq_len, root)
            for n, path in (("moe", a.moe), ("flap", a.flap))
        }
        for n, t in got.items():
            print(
                f"{n:>4} trainer step (ZeRO-2, 1 rank): {t * 1e3:8.1f} ms median ({tokens / t:6.1f} tokens/s)"
            )
        print(f"MoE / FLAP trainer step time: {got['moe'] / got['flap']:.3f}")
    ids = torch.randint(0, vocab, (a.batch, a.seq_len), generator=g)
    self_ms: dict[str, dict[str, float]] = {}
    for name, (model, opt, _) in models.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _step(model, opt, ids)
        self_ms[name] = {ev.key: ev.self_cpu_time_total / 1e3 for ev in prof.key_averages()}
    by_kind = {n: {} for n in self_ms}
    for n, ops in self_ms.items():
        for op, ms in ops.items():
            kind = KINDS.get(op, "attention, embeddings, norms, LM head, optimizer")
            by_kind[n][kind] = by_kind[n].get(kind, 0.0) + ms
    print("one step by kind of work, profiler self CPU ms (MoE | FLAP | MoE - FLAP):")
    for kind in sorted(by_kind["moe"], key=lambda k: -by_kind["moe"][k]):
        m, f = by_kind["moe"][kind], by_kind["flap"].get(kind, 0.0)
        print(f"  {kind:<52} {m:9.1f} {f:9.1f} {m - f:+9.1f}")
    diff = {op: ms - self_ms["flap"].get(op, 0.0) for op, ms in self_ms["moe"].items()}
    print("ops whose self time grows most from FLAP to the MoE (ms):")
    for op, d in sorted(diff.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {op:<40} {self_ms['moe'][op]:9.1f} {self_ms['flap'].get(op, 0.0):9.1f} {d:+9.1f}")


if __name__ == "__main__":
    main()
