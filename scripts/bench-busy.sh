#!/usr/bin/env bash
# Decode speed on a busy machine: tandem and llama.cpp (llama-bench) on the same GGUF, idle and
# beside one CPU-bound neighbour process, with the default thread count (every core) and with
# one thread. Not part of CI (it takes the machine for a few minutes).
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin [TANDEM_BIN=...] scripts/bench-busy.sh [GGUF] [reps]
#
# Default GGUF: SmolLM2-135M Q8_0 made with llama-quantize (as scripts/bench-speed.sh does).
# Issue 15's target: under one busy neighbour, default-thread decode >= the one-thread figure,
# and idle decode unchanged.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the llama.cpp build/bin folder}
reps=${2:-3}
# TANDEM_BIN=path measures another build (e.g. an older commit's) under the same conditions.
if [ -z "${TANDEM_BIN:-}" ]; then (cd "$here" && cargo build --release --quiet); fi
tandem=${TANDEM_BIN:-$here/target/release/tandem}
cache=$(TANDEM_BIN=$tandem "$here/scripts/fetch-models.sh")
model=${1:-$cache/smollm2-q8_0.gguf}
if [ ! -f "$model" ]; then
  [ -f "$cache/smollm2-f16.gguf" ] || "$bin/llama-quantize" --allow-requantize \
    "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" "$cache/smollm2-f16.gguf" F16 >/dev/null 2>&1
  "$bin/llama-quantize" "$cache/smollm2-f16.gguf" "$model" Q8_0 >/dev/null 2>&1
fi
cores=$(nproc)
neighbour=
start_neighbour() { sh -c 'while :; do :; done' & neighbour=$!; sleep 0.5; }
stop_neighbour() { [ -n "$neighbour" ] && kill "$neighbour" 2>/dev/null; wait "$neighbour" 2>/dev/null || true; neighbour=; }
trap stop_neighbour EXIT
tg() { # THREADS-ARG... -> "mean ± sd" decode tok/s of tandem
  "$tandem" "$@" bench --model "$model" --pp 0 --tg 128 --reps "$reps" --json | python3 -c '
import json, sys
r = [x for x in json.load(sys.stdin)["results"] if x["test"].startswith("tg")][0]
print("%.1f ± %.1f" % (r["tok_s"], r["stddev"]))'
}
ltg() { # THREADS -> llama-bench decode tok/s
  "$bin/llama-bench" -m "$model" -t "$1" -p 0 -n 128 -r "$reps" -o json 2>/dev/null | python3 -c '
import json, sys
r = [x for x in json.load(sys.stdin) if x["n_gen"] > 0][0]
print("%.1f ± %.1f" % (r["avg_ts"], r["stddev_ts"]))'
}
echo "## decode tg128 tok/s, $(basename "$model"), $cores cores ($(date -u +%F))"
echo "| machine | threads | tandem | llama.cpp |"
echo "| --- | --- | ---: | ---: |"
echo "| idle | $cores (default) | $(tg) | $(ltg "$cores") |"
echo "| idle | 1 | $(tg --threads 1) | $(ltg 1) |"
start_neighbour
echo "| 1 busy neighbour | $cores (default) | $(tg) | $(ltg "$cores") |"
echo "| 1 busy neighbour | 1 | $(tg --threads 1) | $(ltg 1) |"
stop_neighbour
