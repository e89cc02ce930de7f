#!/usr/bin/env bash
# Prefill/decode speed of tandem beside llama.cpp's llama-bench on the same GGUF files
# (SmolLM2-135M as F16, Q8_0, Q4_0), same threads. Not part of CI.
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/bench-speed.sh [threads]
#
# llama.cpp is built from the copy vendored in the PyPI llama-cpp-python sdist (see
# BENCHMARKS.md). The F16/Q8_0/Q4_0 files are made from the PyPI Q4_1 GGUF with
# llama-quantize (F16 via --allow-requantize), so both engines read identical bytes.
set -euo pipefail
threads=${1:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the llama.cpp build/bin folder}
(cd "$here" && cargo build --release --quiet)
tandem=$here/target/release/tandem
cache=$(TANDEM_BIN=$tandem "$here/scripts/fetch-models.sh")
src=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$cache/smollm2-f16.gguf" ] || "$bin/llama-quantize" --allow-requantize "$src" "$cache/smollm2-f16.gguf" F16 >/dev/null 2>&1
for t in q8_0 q4_0; do
  T=$(echo $t | tr a-z A-Z)
  [ -f "$cache/smollm2-$t.gguf" ] || "$bin/llama-quantize" "$cache/smollm2-f16.gguf" "$cache/smollm2-$t.gguf" "$T" "$threads" >/dev/null 2>&1
done
echo "| type | engine | pp512 tok/s | tg128 tok/s |"
echo "| --- | --- | ---: | ---: |"
# rate TEST JSON: "mean ± sd" for tandem's (pp/tg) or llama-bench's JSON output.
rate() {
  python3 -c '
import json, sys
test, doc = sys.argv[1], json.loads(sys.argv[2])
if isinstance(doc, dict):
    r = [x for x in doc["results"] if x["test"].startswith(test)][0]
    print("%.1f ± %.1f" % (r["tok_s"], r["stddev"]))
else:
    key = "n_prompt" if test == "pp" else "n_gen"
    r = [x for x in doc if x[key] > 0][0]
    print("%.1f ± %.1f" % (r["avg_ts"], r["stddev_ts"]))
' "$1" "$2"
}
for t in f16 q8_0 q4_0; do
  f=$cache/smollm2-$t.gguf
  j=$("$tandem" --threads "$threads" bench --model "$f" --pp 512 --tg 128 --reps 3 --json)
  l=$("$bin/llama-bench" -m "$f" -t "$threads" -p 512 -n 128 -r 3 -o json 2>/dev/null)
  echo "| $t | tandem | $(rate pp "$j") | $(rate tg "$j") |"
  echo "| $t | llama.cpp | $(rate pp "$l") | $(rate tg "$l") |"
done
