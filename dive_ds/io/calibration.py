"""A calibration folder: its files, the writer and the reader (`Calibration`), and the check that a
dense model is the one it was calibrated on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dive_ds.data.sampler import DomainSamples
from dive_ds.io.atomic import staged_dir
from dive_ds.io.loading import LayerwiseCheckpoint, model_fingerprint
from dive_ds.stats import ChannelStats

STATS_FILE = "stats.safetensors"


SAMPLES_FILE = "samples.safetensors"


MANIFEST = "manifest.json"


CLUSTERS_FILE = "clusters.safetensors"
"""With `calibrate --token-clusters C`: the FLAP statistics of each layer's C token clusters (a ChannelStats
whose count is [C, L])."""
SPLIT_FILE = "split.json"
"""Per domain, the span ids (dive_ds.data.split) of the calibration and selection sets used."""


def write_calibration(
    out: Path,
    stats: ChannelStats,
    samples: dict[str, DomainSamples],
    manifest: dict,
    force: bool = False,
    clusters: ChannelStats | None = None,
) -> Path:
    """Write stats + samples + manifest (+ the token clusters' statistics) atomically (temp folder, then rename)."""
    with staged_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in stats.to_tensors().items()}, tmp / STATS_FILE)
        if clusters is not None:  # count [C, L]: clusters differ by layer
            save_file({k: v.contiguous() for k, v in clusters.to_tensors().items()}, tmp / CLUSTERS_FILE)
        tensors = {}
        for name, s in samples.items():
            tensors[f"calib.{name}"] = s.calib.contiguous()
            tensors[f"eval.{name}"] = s.eval.contiguous()
        save_file(tensors, tmp / SAMPLES_FILE)
        split = {name: s.split for name, s in samples.items() if s.split is not None}
        if split:  # the span ids each domain's calibration and selection windows came from
            (tmp / SPLIT_FILE).write_text(json.dumps(split) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass
class Calibration:
    """A calibration run folder, loaded: statistics, windows and manifest."""

    path: Path
    stats: ChannelStats
    domains: list[str]
    families: dict[str, str | None]
    calib: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    manifest: dict
    clusters: ChannelStats | None = None
    """The token clusters' statistics (calibrate --token-clusters), else None."""

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not (path / MANIFEST).exists() or not (path / STATS_FILE).exists():
        raise ValueError(
            f"{path} is not a calibration folder (no {MANIFEST}/{STATS_FILE}); "
            "run `dive-ds calibrate --out DIR` first"
        )
    man = json.loads((path / MANIFEST).read_text())
    stats = ChannelStats.from_tensors(load_file(path / STATS_FILE))
    samples = load_file(path / SAMPLES_FILE)
    names = [d["name"] for d in man["domains"]]
    return Calibration(
        path,
        stats,
        names,
        {d["name"]: d.get("family") for d in man["domains"]},
        {n: samples[f"calib.{n}"] for n in names},
        {n: samples[f"eval.{n}"] for n in names},
        man,
        ChannelStats.from_tensors(load_file(path / CLUSTERS_FILE))
        if (path / CLUSTERS_FILE).is_file()
        else None,
    )


def check_same_model(cal: Calibration, model_dir: str | Path) -> None:
    """Statistics must come from this very model (shapes and a weight fingerprint)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    ffn = cal.stats.sum_DLF.shape
    if (ffn[1], ffn[2]) != (config.num_hidden_layers, config.intermediate_size):
        raise ValueError(
            f"statistics in {cal.path} are for {ffn[1]} layers x {ffn[2]} FFN channels but {model_dir} "
            f"has {config.num_hidden_layers} x {config.intermediate_size}: they come from another model; "
            "re-run `dive-ds calibrate` on this model"
        )
    fp = model_fingerprint(config, LayerwiseCheckpoint(model_dir))
    if fp != cal.fingerprint:
        raise ValueError(
            f"statistics in {cal.path} have model fingerprint {cal.fingerprint} but {model_dir} has {fp}: "
            "they come from another model; re-run `dive-ds calibrate` on this model"
        )


def dense_model_path(cal: Calibration, model: str | None) -> Path:
    from dive_ds.io.loading import local_snapshot, resolve_model

    return Path(local_snapshot(resolve_model(model))) if model else Path(cal.manifest["model"]["path"])
