"""Shared test helpers: tiny random dense models (Llama, Mistral, Qwen2, Qwen3) saved to disk, token corpora."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# family -> (config class, causal-LM class) of the dense models the tests build on the fly
DENSE_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return LlamaConfig(**base)


def save_tiny_llama(folder: Path, seed: int = 0, **kw) -> LlamaForCausalLM:
    return save_tiny_dense(folder, "llama", seed, **kw)


def save_tiny_dense(folder: Path, family: str = "llama", seed: int = 0, **kw):
    """A tiny random dense model of a family (the Llama sizes above), saved as safetensors. Norms (Qwen3's
    q/k norms included) and biases (Qwen2's q/k/v) get non-trivial values so that they matter in the tests."""
    config_cls, model_cls = (getattr(transformers, n) for n in DENSE_CLASSES[family])
    config = tiny_llama_config(**kw)
    if family != "llama":
        config = config_cls(**config.to_diff_dict() | {"model_type": family})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def make_tiny_calibration(
    root: Path,
    n_domains: int = 4,
    windows: int = 6,
    seq_len: int = 16,
    n_eval: int = 3,
    seed: int = 0,
    families=None,
    model_family: str = "llama",
    **model_kw,
) -> tuple[Path, Path]:
    """A tiny random dense model (Llama unless model_family says otherwise) on disk plus a calibration
    folder for it (random-token domains with different token distributions, so domains differ).
    Returns (model_dir, calib_dir)."""
    from dive_ds.build.calib_pass import CalibConfig, streaming_stats
    from dive_ds.build.outputs import run_manifest_base
    from dive_ds.data.sampler import DomainSamples
    from dive_ds.io.calibration import write_calibration
    from dive_ds.io.loading import LayerwiseCheckpoint, model_fingerprint

    model_dir, calib_dir = root / "dense", root / "calib"
    model = save_tiny_dense(model_dir, model_family, seed=seed, **model_kw)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    samples = {}
    for d in range(n_domains):
        lo = (d * vocab) // (2 * n_domains)  # each domain favours its own slice of the vocabulary
        ids = torch.randint(lo, lo + vocab // 2, ((windows + n_eval), seq_len), generator=g)
        samples[f"dom{d}"] = DomainSamples(
            calib=ids[:windows], eval=ids[windows:], calib_pool_tokens=windows * seq_len, documents=1
        )
    stats, info = streaming_stats(
        model_dir, {k: s.calib for k, s in samples.items()}, CalibConfig(progress=False)
    )
    fams = families or [f"fam{d // 2}" for d in range(n_domains)]
    manifest = run_manifest_base("calibration") | {
        "identity": {"test": True},
        "model": {
            "path": str(model_dir),
            "fingerprint": model_fingerprint(model.config, LayerwiseCheckpoint(model_dir)),
        },
        "domains": [
            {
                "name": n,
                "family": fams[i],
                "documents": 1,
                "calib_pool_tokens": s.calib.numel(),
                "calib_tokens": s.calib.numel(),
                "eval_tokens": s.eval.numel(),
            }
            for i, (n, s) in enumerate(samples.items())
        ],
        "pass": info | {"sampling_seconds": 0.0},
    }
    write_calibration(calib_dir, stats, samples, manifest)
    return model_dir, calib_dir


# --------------------------------------------------------------------------- CLI and folder checks


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root -> (kind, size, mtime_ns, content hash for files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        key = str(p.relative_to(root))
        if p.is_file() and not p.is_symlink():
            out[key] = ("f", st.st_size, st.st_mtime_ns, hash(p.read_bytes()))
        else:
            out[key] = ("d" if p.is_dir() else "l", st.st_mtime_ns)
    return out


def cli(argv: list[str], capsys, entry=None) -> int:
    """Run a command with capture cleared first (setup may print progress bars)."""
    capsys.readouterr()
    from dive_ds.cli import main

    return (entry or main)(argv)


def one_line_error(capsys, prefix: str = "dive-ds: error: ") -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """`torchrun --nproc-per-node N args...` on CPU (1 thread per rank, the repo importable) -> CompletedProcess."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    full_env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"} | (env or {})
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
