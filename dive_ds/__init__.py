"""dive_ds: DIVE dense-to-MoE reconstruction and DeepSpeed retraining."""

__version__ = "0.1.0"

from dive_ds.models.moe import register as _register  # noqa: E402

_register()  # "dive_moe" becomes known to AutoConfig / AutoModelForCausalLM
