#!/usr/bin/env bash
# Quality of tandem's quantizations of SmolLM2-135M beside llama.cpp's own, same text and chunks.
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/bench-quality.sh [CHUNKS] [THREADS]
# tandem: `tandem quantize --sweep` (q8_0, q4_0, q4_k with everything quantized = @all; the
# default policy "attention 16-bit + MLP q4_0/q4_k"; with and without an imatrix calibrated on
# the bundled Austen text) evaluated by tandem eval on wiki.test.raw, ctx 512.
# llama.cpp: llama-quantize Q8_0/Q4_0/Q4_K_S/Q4_K_M of the same F16 weights, then
# llama-perplexity --kl-divergence against the F16 base on the same text and chunks.
set -euo pipefail
source "$(dirname "$0")/common.sh"
C=${1:-8}; N=${2:-2}
out=${OUT:-$root/target/bench-quality}; mkdir -p "$out"
[ -f "$out/imatrix.gguf" ] || "$T" --threads $N calibrate "$smol" --out "$out/imatrix.gguf" --quiet
"$T" --threads $N quantize "$smol" --sweep q8_0@all,q4_0@all,q4_k@all,q4_0,q4_k,q4_k@all+imatrix,q4_k+imatrix \
  --imatrix "$out/imatrix.gguf" --eval-text "$W" --out-dir "$out/sweep" --ctx 512 --chunks $C --quiet
cat "$out/sweep/report.md" | sed -n '5,20p'
echo; echo "llama.cpp (llama-perplexity --kl-divergence, ctx 512, $C chunks, $N threads):"
[ -f "$out/f16.gguf" ] || "$T" quantize "$smol" --out "$out/f16.gguf" --scheme f16 --attention f16 --embeddings f16 --quiet >/dev/null
"$B/llama-perplexity" -m "$out/f16.gguf" -f "$W" -c 512 --chunks $C -t $N --kl-divergence-base "$out/base.kld" 2>&1 | grep -E "Final estimate"
for q in Q8_0 Q4_0 Q4_K_S Q4_K_M; do
  [ -f "$out/lc-$q.gguf" ] || "$B/llama-quantize" "$out/f16.gguf" "$out/lc-$q.gguf" $q $N >/dev/null 2>&1
  r=$("$B/llama-perplexity" -m "$out/lc-$q.gguf" -f "$W" -c 512 --chunks $C -t $N --kl-divergence-base "$out/base.kld" --kl-divergence 2>&1)
  ppl=$(echo "$r" | grep -E "^Mean PPL\(Q\) +:" | awk '{print $4}')
  kld=$(echo "$r" | grep -E "^Mean    KLD:" | awk '{print $3}')
  top=$(echo "$r" | grep -E "^Same top p:" | awk '{print $4}')
  printf "  %-7s %9s MiB  PPL %s  mean KLD %s  same top %s%%\n" $q "$(python3 -c "print(f'{$(stat -c %s "$out/lc-$q.gguf")/2**20:.1f}')")" "$ppl" "$kld" "$top"
done
