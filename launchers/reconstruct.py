#!/usr/bin/env python
"""Cluster entry for the reconstruction side of DIVE (same sub-commands as `dive-ds`).

    python launchers/reconstruct.py calibrate --model M --domains R --out runs/x/calib
    python launchers/reconstruct.py mine --calib runs/x/calib --experts 8 --out runs/x/mining
    python launchers/reconstruct.py reconstruct --calib runs/x/calib --groups runs/x/mining/groups.json \
        --preset 1of8 --out runs/x/moe

SLURM scripts call this file so that a job never depends on the console script being on PATH.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dive_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
