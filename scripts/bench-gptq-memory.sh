#!/usr/bin/env bash
# Peak memory of calibrated quantization at scale (issue 16, requirement 5): GPTQ of a
# synthetic 3.1B-parameter checkpoint (random F16, 6.24 GB in three safetensors shards), which
# holds one decoder layer at a time. Needs python3 with numpy for the synthetic checkpoint
# (written once to DIR, default /tmp/synth) and ~10 GB of free disk; ~8 minutes on 2 threads.
#   scripts/bench-gptq-memory.sh [THREADS] [DIR] [EXTRA QUANTIZE OPTIONS, e.g. --act-order=false]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
T=${TANDEM_BIN:-$root/target/release/tandem}
N=${1:-2}
synth=${2:-/tmp/synth}
shift $(( $# < 2 ? $# : 2 ))
[ -f "$synth/config.json" ] || python3 "$root/scripts/synthetic-checkpoint.py" "$synth"
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
/usr/bin/time -v -o "$w/time" "$T" --threads "$N" quantize "$synth" \
  --out "$w/synth-gptq.gguf" --scheme q4_0 --method gptq --calib-chunks 2 "$@" >"$w/out" 2>&1 || {
  tail -5 "$w/out"; exit 1; }
tr '\r' '\n' <"$w/out" | grep -E "^gptq:|^wrote" || true
du -sb "$synth" | awk '{printf "checkpoint: %.2f GB\n", $1/1e9}'
grep -E "Maximum resident|Elapsed" "$w/time"
