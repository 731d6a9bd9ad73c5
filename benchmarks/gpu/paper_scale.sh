#!/usr/bin/env bash
# The papers' scale on one GPU: train the ImageNet-MobileNetV2 baseline, GOAT-FNA, JAD and
# DDID at 256x128 on market1501-trainsplit, run the protocol grid on them, write the records
# and one table (benchmarks/gpu/paper_scale.py says how the budget is planned).
#
#   REIDBENCH_DATA=DIR REIDBENCH_WEIGHTS=DIR bash benchmarks/gpu/paper_scale.sh OUT [BUDGET_S]
#
# DIR for the data holds market1501-trainsplit/bounding_box_train (about 30 MB of JPEGs);
# DIR for the weights holds imagenet/mobilenet_v2-imagenet1k.safetensors. Nothing is
# downloaded. The run stops starting work before BUDGET_S (default 480) and is killed 30 s
# after it; the table is written from whatever cells finished, in either case.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:?usage: paper_scale.sh OUT [BUDGET_S]}"
budget="${2:-480}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export REIDBENCH_CACHE="${REIDBENCH_CACHE:-$out/cache}" REIDBENCH_QUIET=1 PYTHONUNBUFFERED=1
shift $(( $# >= 2 ? 2 : 1 ))
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/nvidia-smi.txt"
timeout --signal=INT --kill-after=20 "$(( ${budget%.*} + 30 ))" \
    python3 "$here/paper_scale.py" run --out "$out" --budget-s "$budget" --device "${DEVICE:-cuda}" "$@" 2>&1 | tee "$out/run.log"
python3 "$here/paper_scale.py" table --out "$out"
