"""DIVE phase 3: retraining the reconstructed MoE with DeepSpeed (stages, data stream, metrics).

Entry points: `dive_ds.train.loop.retrain` (what launchers/retrain.py calls) and
`dive_ds.train.loop.train` (on an already initialised process group, e.g. in tests);
`dive_ds.train.loop.consolidate_checkpoint` turns a ZeRO checkpoint into a plain HF model.
"""

from dive_ds.train.config import RunConfig, load_run_config, resolve_ds_config

__all__ = ["RunConfig", "load_run_config", "resolve_ds_config"]
