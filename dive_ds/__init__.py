"""dive_ds: DIVE dense-to-MoE reconstruction and DeepSpeed retraining."""

__version__ = "0.1.0"


def _register() -> None:
    try:
        from dive_ds.models.moe import register
    except ImportError:  # model module not built yet in a partial checkout
        return
    register()


_register()
