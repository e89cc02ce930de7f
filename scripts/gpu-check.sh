#!/usr/bin/env bash
# The GPU check (issue 6): build with --features cuda, run the GPU tests, then print one table
# of plain and speculative tok/s (GPU linear layers vs the CPU) and the kernels' GB/s against
# the device's measured read bandwidth. Made to finish in well under 8 minutes on a fresh
# GPU machine with no network (the crates must be vendored or already in ~/.cargo).
#
#   scripts/gpu-check.sh                 # bundled stories260K end to end
#   MODEL=/path/smollm2.gguf scripts/gpu-check.sh   # also a real 135M model, if one is there
#
# Without a GPU every step says "skipped" and the script still exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
say() { echo "[gpu-check +$(( $(date +%s) - start ))s] $*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
say "build (--features cuda)"
cargo build --release --features cuda --bin tandem 2>&1 | tail -2 >&2
cargo build --release -p tandem-kernels --features cuda --example gpu_bench 2>&1 | tail -1 >&2
T=target/release/tandem

say "GPU tests"
cargo test --release -p tandem-kernels --features cuda --test gpu -- --nocapture 2>&1 \
  | grep -E "test result|skipped|panicked|FAILED" >&2
cargo test --release -p tandem-kernels --features cuda --lib cuda 2>&1 | grep -E "test result|skipped" >&2

model=models/stories260K
prompt="Once upon a time"
say "greedy text: GPU linear layers vs CPU (f32 activations on both)"
a=$($T --activations f32 generate --model $model --prompt "$prompt" --max-tokens 64 2>/dev/null)
if b=$($T --gpu --activations f32 generate --model $model --prompt "$prompt" --max-tokens 64 2>/dev/null); then
  if [ "$a" = "$b" ]; then say "same text on GPU and CPU"; else say "TEXT DIFFERS"; echo "cpu: $a" >&2; echo "gpu: $b" >&2; fi
else
  say "skipped: tandem --gpu did not start (no usable GPU)"
fi

rows=()
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run_spec() { # label, extra flags...
  local label=$1; shift
  local j=$tmp/spec.json
  rm -f "$j"
  if $T "$@" bench spec --model "$m" --draft ngram --max-tokens 128 --json "$j" >/dev/null 2>&1; then
    rows+=("| $label | $(basename "$m") | $(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['total']; print(f\"{d['plain_tok_s']:.1f} | {d['spec_tok_s']:.1f} | {d['speedup']:.2f}x\")" "$j" 2>/dev/null || echo "n/a | n/a | n/a") |")
  else
    rows+=("| $label | $(basename "$m") | skipped | | |")
  fi
}
for m in $model ${MODEL:-}; do
  say "bench spec on $m (cpu, gpu)"
  run_spec "CPU (all cores)" 
  run_spec "GPU linear layers" --gpu
done

echo
echo "## tandem GPU check ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'))"
echo
echo "| where | model | plain tok/s | speculative (ngram) tok/s | speedup |"
echo "| --- | --- | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
target/release/examples/gpu_bench
say "done"
