#!/usr/bin/env bash
# Rebuilds tests/fixtures/llama-quantize with llama.cpp's tools (not needed for tests or CI).
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/make-quant-fixtures.sh
# Needs: a release build of tandem, SmolLM2 fetched (scripts/fetch-models.sh), python3 with
# `pip install gguf` (llama.cpp's gguf-py) for cutting rows.
set -euo pipefail
source "$(dirname "$0")/common.sh"
F=$root/tests/fixtures/llama-quantize
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
all16=(--scheme f16 --attention f16 --embeddings f16 --quiet)
"$T" quantize "$root/models/stories260K" --out "$w/stories-f16.gguf" "${all16[@]}"
"$T" quantize "$smol" --out "$w/smollm-f16.gguf" "${all16[@]}"
for t in Q8_0 Q4_0; do "$B/llama-quantize" --pure "$w/stories-f16.gguf" "$F/stories260K-$t.gguf" $t; done
for t in Q8_0 Q4_0 Q4_K; do "$B/llama-quantize" --pure "$w/smollm-f16.gguf" "$w/smollm-$t.gguf" $t; done
python3 "$root/scripts/fixture-rows.py" "$F/smollm2-rows.gguf" \
  "$w/smollm-Q4_K.gguf:blk.0.ffn_down.weight" "$w/smollm-Q4_K.gguf:blk.3.attn_k.weight" \
  "$w/smollm-Q8_0.gguf:blk.7.ffn_up.weight" "$w/smollm-Q4_0.gguf:blk.11.attn_q.weight" \
  "$w/smollm-Q4_0.gguf:token_embd.weight"
head -c 20000 "$root/quantize/data/austen-emma-calibration.txt" > "$w/cal.txt"
"$B/llama-imatrix" -m "$w/stories-f16.gguf" -f "$w/cal.txt" -c 128 --chunks 4 -o "$F/stories260K-imatrix.gguf"
"$B/llama-imatrix" -m "$w/stories-f16.gguf" -f "$w/cal.txt" -c 128 --chunks 4 -o "$F/stories260K-imatrix.dat" --output-format dat
for t in Q4_0 Q4_1 Q5_0 Q5_1; do
  "$B/llama-quantize" --pure --imatrix "$F/stories260K-imatrix.gguf" "$w/stories-f16.gguf" "$F/stories260K-$t-imatrix.gguf" $t
done
echo "fixtures rebuilt in $F"
