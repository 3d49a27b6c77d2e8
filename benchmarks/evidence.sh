#!/usr/bin/env bash
# The headline comparison under issue 20's protocol, on the demo pack (12 seen domains, the unseen pack):
# calibrate, mine 6 groups on the selection windows, then `dive-ds compare` and its README block.
# Resumable: a present calibration or mining is kept, and a rerun of compare resumes.
#   benchmarks/evidence.sh [OUT]   (default runs/ev; about 2.5 h on 2 CPU cores; compare.time: wall time)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ev}
DIVE=${DIVE:-.venv/bin/dive-ds}
mkdir -p "$OUT"
[ -f "$OUT/calib/manifest.json" ] || $DIVE calibrate --demo --no-progress --out "$OUT/calib"
[ -f "$OUT/mining/groups.json" ] || $DIVE mine --calib "$OUT/calib" --experts 6 --eval-windows 4 --out "$OUT/mining"
/usr/bin/time -o "$OUT/compare.time" -v \
    $DIVE compare --calib "$OUT/calib" --groups "$OUT/mining/groups.json" --out "$OUT/compare" \
    --eval-domains demo-unseen --treatments fitted --steps 64 --eval-every 16 --fit-windows 4 \
    --methods dive,nomining,llama-moe,flap,flap-adaptive,flap-eqtrain --grouping-seeds 1,2,3 \
    --data-seeds 1234,5678
$DIVE compare-report --json "$OUT/compare/compare.json" --readme docs/results.md
$DIVE compare-report --json "$OUT/compare/compare.json" --readme README.md
