"""The names the command line offers, kept free of heavy imports so `dive-ds --help` needs no torch.

The modules that act on them (parallel.ranks, expert_plan) import them from here.
"""

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("fp32", "bf16")
PRESETS = {
    "1of8": dict(num_experts=8, top_k=1, prune_ratio=0.5),
    "2of8": dict(num_experts=8, top_k=2, prune_ratio=0.75),
}
METHOD_ALIASES = {"random-split": "random-halves"}
"""Deprecated method names -> the method (ReconstructConfig normalises them)."""
METHODS = (
    "dive",
    "random-halves",
    "llama-moe",
    "upcycle",
    "nomining",
    "flap",
    "flap-adaptive",
    *METHOD_ALIASES,
)
ROUTER_INITS = ("random", "centroid", "fit")


# The embedded default: small enough for a 2-core laptop (the reference recipe is 1024 x 256).
DEMO = {
    "model": "demo",
    "domains": "demo",
    "samples_per_domain": 16,  # = `dive-ds demo`; math_problems (32k characters) has ~4.7k calibration-set tokens
    "seq_len": 256,
    "eval_windows": 4,  # selection windows; math_problems' selection set holds 5
    "out": "runs/demo",
}
