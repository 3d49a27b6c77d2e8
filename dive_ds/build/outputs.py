"""Output folders: a command reuses its own earlier output of the same run, refuses anything else.

A command that writes a folder records the identity of its run there (the settings and input
fingerprints that decide the output). Writing into an existing folder is then:

- absent, or an empty folder: write it;
- holds this command's output with the same identity: reuse it, write nothing;
- anything else (another run, or files this command did not write): refused in one line,
  unless --force, which replaces the folder;
- a regular file, a symbolic link, or a folder that is (or holds) one of the run's inputs:
  always refused, --force or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dive_ds.io.fingerprint import git_rev
from dive_ds.parallel.ranks import dtype_record


def read_identity(record: Path) -> dict | None:
    """The "identity" entry of a JSON record file (None if the file is missing, unreadable or has none)."""
    try:
        identity = json.loads(record.read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None
    return identity if isinstance(identity, dict) else None


def first_difference(old: dict, new: dict) -> str:
    """`key: old != new` for the first differing entry of two identities."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} != {new.get(key)!r}"
    return "same"


def check_not_input(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder that is one of the run's inputs or contains one (replacing it would
    delete the input)."""
    target = out.resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p == target or target in p.parents:
            raise ValueError(
                f"--out {out} {'is' if p == target else 'contains'} the {what} {path}, an input of this run; "
                "choose another --out"
            )


def claim_output(
    out: Path, identity: dict, recorded: dict | None, record: str, force: bool, has_force: bool = True
) -> bool:
    """May this run write `out`? True: `out` already holds this very run (reuse it, write nothing).
    False: write it (absent, empty, or --force). Raises a one-line ValueError otherwise.

    `recorded`: the identity this command recorded in `out` (None: none, or not this command's layout);
    `record`: the name of that record file, for the message; `has_force`: the command has --force.
    """
    fix = "choose another --out or pass --force" if has_force else "choose another --out (or empty it)"
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; pass the folder it points to or another --out")
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file, not a folder; choose another --out")
    if not any(out.iterdir()):
        return False
    if recorded is not None and recorded == identity:
        return True
    if force:
        return False
    if recorded is None:
        raise ValueError(f"output folder {out} is not empty and holds no {record} of this command; {fix}")
    raise ValueError(
        f"output folder {out} holds a different run ({record}: {first_difference(recorded, identity)}); {fix}"
    )


# --------------------------------------------------------------------------- evaluate

EVAL_FILES = ("eval.json", "eval.md", "tb")  # tb/: the TensorBoard scalars


PENDING_EVAL = ".eval-pending.json"
"""Written first and removed last by `evaluate`: names the evaluation whose files may be half there."""


def evaluation_identity(
    model_dir: Path, calib_dir, registry, eval_windows, seq_len, seed, oracle, router, dtype: str = "fp32"
) -> dict:
    """What decides `dive-ds evaluate`'s numbers: the model (absolute path, fingerprint), the windows and the
    precision (`dtype`, --dtype's name: bf16 numbers differ; fp32 folders from before --dtype stay valid)."""
    from dive_ds.io.fingerprint import input_record

    if calib_dir is not None:
        source = {"calibration": str(Path(calib_dir).resolve())}
    elif registry is not None:
        source = {"registry": str(Path(registry).resolve()) if Path(registry).exists() else str(registry),
                  "seq_len": seq_len, "seed": seed}  # fmt: skip
    else:  # lm-eval tasks only (their names join the identity in run_evaluate)
        source = {}
    model = input_record(model_dir) if model_dir.is_dir() else {"path": str(model_dir)}
    precision = {} if dtype == "fp32" else {"dtype": dtype_record(dtype)}
    return {"model": model, **source, "eval_windows": eval_windows, "oracle": oracle, "router": router,
            **precision}  # fmt: skip


def claim_eval_out(out: Path, identity: dict) -> None:
    """evaluate writes eval.json, eval.md and tb/ into `out` (other files there stay untouched): refused when
    `out` is not a folder, or holds those files from another evaluation (rerunning the same one rewrites them)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} exists and is not a folder; choose another --out")
    present = [f for f in EVAL_FILES if (out / f).exists()]
    if not present:
        return
    recorded = read_identity(out / "eval.json")
    if recorded is None and read_identity(out / PENDING_EVAL) == identity:
        return  # this same evaluation, killed while it wrote: it writes them again
    if recorded is None:
        raise ValueError(
            f"--out {out} holds {present[0]} but not of a `dive-ds evaluate` run; choose another --out"
        )
    if recorded != identity:
        raise ValueError(
            f"--out {out} holds another evaluation ({first_difference(recorded, identity)}); "
            "choose another --out (or delete its eval.json, eval.md and tb/)"
        )


# --------------------------------------------------------------------------- reconstruct


def reconstruction_identity(plan, cfg, model_dir: Path, model_fingerprint: str) -> dict:
    """What decides the bits of `write_moe`'s output: the expert plan (kept channels, the means behind
    the biases, router init, groups and MoE config: from the statistics and settings) and the dense
    weights (their fingerprint)."""
    import torch
    from transformers import AutoConfig

    from dive_ds.build.moe_writer import moe_config_dict, plan_fingerprint

    moe_config = moe_config_dict(AutoConfig.from_pretrained(model_dir), cfg, plan.widths_L)
    return {
        "plan_fingerprint": plan_fingerprint(plan, moe_config, torch.float32),
        "dense_model_fingerprint": model_fingerprint,
    }


def recorded_reconstruction(out: Path, identity: dict | None = None, plan=None) -> dict | None:
    """The identity `write_moe` recorded in `out`'s dive_experts.json, if `out` still holds its output:
    exactly its file layout and, when the record equals `identity`, the router weights of `plan`.
    A model derived from a reconstruction carries a copy of dive_experts.json but other weights:
    retrained (other files), or with fitted routers (`dive-ds fit-router`: same files, other routers)."""
    try:
        files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
        layers = int(json.loads((out / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    expected = {"model-shared.safetensors"} | {f"model-layer-{i:05d}.safetensors" for i in range(layers)}
    if files != expected or not all((out / f).is_file() for f in files):
        return None
    recorded = read_identity(out / "dive_experts.json")
    if recorded is None or recorded != identity or plan is None:
        return recorded
    return recorded if _holds_routers(out, plan, layers) else None


def _holds_routers(out: Path, plan, layers: int) -> bool:
    import torch
    from safetensors import safe_open

    if plan.router_ELH.shape[1] != layers:
        return False
    try:
        for layer in range(layers):
            with safe_open(out / f"model-layer-{layer:05d}.safetensors", "pt") as f:
                router = f.get_tensor(f"model.layers.{layer}.mlp.gate.weight")
            if not torch.equal(router, plan.router_ELH[:, layer].to(router.dtype)):
                return False
    except Exception:  # unreadable file or missing tensor: not (any more) write_moe's output
        return False
    return True


def run_manifest_base(kind: str) -> dict:
    import dive_ds

    return {
        "kind": kind,
        "dive_ds_version": dive_ds.__version__,
        "git_rev": git_rev(short=True),
        "torch": torch.__version__,
    }


def check_new_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; choose a new --out (nothing was written)")
