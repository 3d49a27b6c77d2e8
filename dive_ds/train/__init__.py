"""DIVE phase 3: retraining the reconstructed MoE with DeepSpeed (stages, data stream, metrics).

Entry points: `dive_ds.train.retrain.retrain` (what `dive-ds retrain` and launchers/retrain.py call,
through dive_ds/commands/retrain.py) and
`dive_ds.train.retrain.train` (on an already initialised process group, e.g. in tests);
`dive_ds.train.export.consolidate_checkpoint` turns a ZeRO checkpoint into a plain HF model.

Modules: retrain (orchestration of the stages), planning (which stages, where), stage (one stage's
step loop), model (loading the input), trainable (what trains), schedule (lr), evaluation (loss and
held-out evaluation), checkpoint (save, load, commit, tags), rng (RNG states), export (stage outputs,
consolidation), stop (signals, the stop file), faults (test fault injection), config, data, metrics.
The process group: dive_ds.parallel.distributed.
"""

from dive_ds.train.config import RunConfig
from dive_ds.train.config_load import load_run_config
from dive_ds.train.ds_config import resolve_ds_config

__all__ = ["RunConfig", "load_run_config", "resolve_ds_config"]
