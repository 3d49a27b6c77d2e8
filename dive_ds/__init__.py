"""dive_ds: DIVE dense-to-MoE reconstruction and DeepSpeed retraining.

Importing the package is cheap: it does not import torch, transformers, deepspeed, datasets or lm_eval
(each command imports what it needs). The "dive_moe" model type is still known to AutoConfig /
AutoModelForCausalLM wherever transformers is used after `import dive_ds`: see dive_ds.autoregister.
"""

__version__ = "0.1.0"

from dive_ds.autoregister import install as _install  # noqa: E402

_install()
