#!/usr/bin/env bash
# What the two beyond-DIVE designs cost (issue 25): the calibration pass with and without token clusters, and
# the router fit and parameters of DIVE, DIVE with a shared expert (s = 0.25) and token-cluster experts, on
# 3 demo domains x 16 windows of 128 tokens (the demo model). Prints one line per output.
#   benchmarks/beyond_cost.sh [OUT]   (default /tmp/beyond_cost; about 4 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-/tmp/beyond_cost}
DIVE=${DIVE:-.venv/bin/dive-ds}
mkdir -p "$D"
C=(--demo --only wiki_evals code_stdlib math_solutions --samples-per-domain 16 --seq-len 128 --eval-windows 2 --no-progress)
$DIVE calibrate "${C[@]}" --out "$D/cal" > "$D/cal.log"
$DIVE calibrate "${C[@]}" --token-clusters 3 --out "$D/calc" > "$D/calc.log"
echo '{"a": ["wiki_evals"], "b": ["code_stdlib"], "c": ["math_solutions"]}' > "$D/groups.json"
$DIVE reconstruct --calib "$D/cal" --groups "$D/groups.json" --experts 3 --router-init fit --out "$D/dive" > "$D/dive.log"
$DIVE reconstruct --calib "$D/cal" --groups "$D/groups.json" --experts 3 --shared-ratio 0.25 --router-init fit \
    --out "$D/shared" > "$D/shared.log"
$DIVE reconstruct --calib "$D/calc" --groups-from clusters --experts 3 --router-init fit --out "$D/clusters" > "$D/clusters.log"
python3 - "$D" <<'P'
import json, sys
d = sys.argv[1]
for c in ("cal", "calc"):
    p = json.load(open(f"{d}/{c}/manifest.json"))["pass"]
    tc = p.get("token_clusters")
    print(f"calibration {c}: {p['seconds']} s, {p['tokens']} tokens, {p['tokens_per_s']} tokens/s"
          + (f", smallest cluster per layer {tc['smallest_per_layer']}" if tc else ""))
for m in ("dive", "shared", "clusters"):
    r = json.load(open(f"{d}/{m}/router_fit.json"))
    n = json.load(open(f"{d}/{m}/dive_experts.json"))["parameters"]
    print(f"{m}: fit {r['seconds']} s, held-out label accuracy {r['mean_label_accuracy_heldout']}, parameters total "
          f"{n['total'] / 1e6:.1f}M, activated {n['activated'] / 1e6:.1f}M, trainable {n['trainable'] / 1e6:.2f}M")
P
