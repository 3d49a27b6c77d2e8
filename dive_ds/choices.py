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
