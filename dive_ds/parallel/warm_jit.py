"""Build DeepSpeed's JIT ops once (shm_comm on CPU) so later runs start fast.

`deepspeed.init_distributed()` compiles the `shm_comm` extension on first use (about 40 s,
cached in $TORCH_EXTENSIONS_DIR). Running it here, inside `make` set-up, keeps that cost out
of every test and every demo run.
"""

import os
import time


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.time()
    from dive_ds.parallel.distributed import setup_distributed, teardown_distributed

    setup_distributed()  # a 1-rank world: the same initialisation as retraining
    teardown_distributed()
    print(
        f"deepspeed JIT ops ready ({time.time() - t0:.1f}s, cache {os.environ.get('TORCH_EXTENSIONS_DIR')})"
    )


if __name__ == "__main__":
    main()
