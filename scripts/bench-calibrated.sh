#!/usr/bin/env bash
# Calibrated quantization (GPTQ, activation-aware scaling, importance matrix) of SmolLM2-135M
# beside rounding, llama.cpp's own Q4_0 and (optionally) llm-compressor's GPTQ W4A16, all scored
# by tandem eval against the F16 model on wikitext-2 and on a second text never tuned on
# (Austen's Persuasion). Calibration is the default text (the bundled opening of Emma, then
# SmolLM2's answers to the bundled requests); the rows beside llm-compressor, and the timed
# one, calibrate on Emma's opening alone, as llm-compressor does (same text); two rows add
# freshly generated answers (--calib-self) at q4_0 and q4_k.
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin [VENV=/path/to/venv] scripts/bench-calibrated.sh [CHUNKS] [CHUNKS2]
# VENV: a virtual environment with torch, transformers, llmcompressor (PyPI) for the peer row.
set -euo pipefail
source "$(dirname "$0")/common.sh"
C=${1:-24}; C2=${2:-$C}   # chunks of wikitext, of Persuasion
out=${OUT:-$root/target/bench-calibrated}; mkdir -p "$out"
P=$root/../shared/data/austen/persuasion.txt
cal=$root/quantize/data/austen-emma-calibration.txt
[ -f "$out/imatrix.gguf" ] || "$T" calibrate "$smol" --out "$out/imatrix.gguf" --quiet
variants=q4_0,q4_0+gptq,q4_0+awq,q4_0+awq+gptq,q4_0@all,q4_0@all+gptq,q4_0@all+awq+gptq,q4_k+imatrix,q4_k+gptq,q4_k+imatrix+gptq
"$T" quantize "$smol" --sweep $variants --imatrix "$out/imatrix.gguf" --eval-text "$W" \
  --out-dir "$out/sweep" --ctx 512 --chunks $C --speed-pp 0 --quiet 2>&1 | grep -E "calibrated|bytes in"
# GPTQ timed on its own: the default calibration, and Emma's opening alone (the text
# llm-compressor calibrates on below: the same-text row and the time compared with its).
/usr/bin/time -f "tandem quantize --method gptq: %e s wall, %M KiB peak RSS" \
  "$T" quantize "$smol" --out "$out/gptq-timed.gguf" --scheme q4_0 --method gptq --force --quiet 2>&1 | grep -E "calibrated|wall"
/usr/bin/time -f "tandem quantize --method gptq --calib-text emma: %e s wall, %M KiB peak RSS" \
  "$T" quantize "$smol" --out "$out/q4_0-gptq-emma.gguf" --scheme q4_0 --method gptq --calib-text "$cal" --force --quiet 2>&1 | grep -E "calibrated|wall"
# GPTQ calibrated on Emma and on 16k tokens of the model's own answers (--calib-self).
[ -f "$out/q4_0-gptq-self.gguf" ] || /usr/bin/time -f "tandem quantize --method gptq --calib-self 16384: %e s wall, %M KiB peak RSS" \
  "$T" quantize "$smol" --out "$out/q4_0-gptq-self.gguf" --scheme q4_0 --method gptq --calib-self 16384 --quiet 2>&1 | grep -E "calibrated|wall"
# The q4_k policy meets issue 16's <= 0.014 only with self-calibration (BENCHMARKS, session 16).
[ -f "$out/q4_k-gptq-self.gguf" ] || /usr/bin/time -f "tandem quantize --scheme q4_k --method gptq --calib-self 16384: %e s wall, %M KiB peak RSS" \
  "$T" quantize "$smol" --out "$out/q4_k-gptq-self.gguf" --scheme q4_k --method gptq --calib-self 16384 --quiet 2>&1 | grep -E "calibrated|wall"
models=(--model "$out/q4_0-gptq-emma.gguf" --model "$out/q4_0-gptq-self.gguf" --model "$out/q4_k-gptq-self.gguf")
for v in ${variants//,/ }; do models+=(--model "$out/sweep/$(echo $v | tr '@+' '--').gguf"); done
[ -f "$out/f16.gguf" ] || "$T" quantize "$smol" --out "$out/f16.gguf" --scheme f16 --attention f16 --embeddings f16 --quiet >/dev/null
[ -f "$out/llama.cpp-Q4_0.gguf" ] || "$B/llama-quantize" "$out/f16.gguf" "$out/llama.cpp-Q4_0.gguf" Q4_0 >/dev/null 2>&1
models+=(--model "$out/llama.cpp-Q4_0.gguf")
if [ -n "${VENV:-}" ]; then
  for opt in static none; do
    d=$out/llmcompressor-gptq-w4a16-g32-actorder-$opt
    [ -d "$d" ] || "$VENV/bin/python" "$root/scripts/peers/llmcompressor_gptq.py" "$smol" "$cal" "$d" --actorder $opt --threads 2 | tail -1
    models+=(--model "$d")
  done
fi
for text in "$W" "$P"; do
  name=$(basename "$text" .txt); n=$C; [ "$text" = "$P" ] && n=$C2
  "$T" eval --reference "$smol" "${models[@]}" --text "$text" --chunks $n --ctx 512 --speed-pp 0 \
    --out "$out/eval-$name" --force --quiet 2>&1 | grep -E "PPL"
done
