#!/usr/bin/env bash
# Runs llama.cpp on GGUF files written by `tandem quantize` and compares with tandem's own
# runtime on the same files: greedy text (llama-simple vs tandem generate) and perplexity
# (llama-perplexity vs tandem perplexity, wiki.test.raw, same ctx and chunks).
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/check-llama-cpp-compat.sh [THREADS] [CHUNKS]
set -euo pipefail
source "$(dirname "$0")/common.sh"
N=${1:-2}; C=${2:-8}
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
prompts=("The history of the Roman Empire" "It is a truth universally acknowledged, that" "def fibonacci(n):")
for spec in "q8_0:" "q4_0:" "q4_k:" "q4_0:--attention q4_0" "q4_0:--method gptq" "q4_0:--method gptq --calib-self 16384" "q4_k:--method awq+gptq" "stories-f16:"; do
  t=${spec%%:*}; extra=${spec#*:}
  if [ "$t" = stories-f16 ]; then
    f=$w/stories.gguf; "$T" quantize "$root/models/stories260K" --out "$f" --scheme f16 --embeddings keep --quiet >/dev/null
  else
    f=$w/$t${extra// /}.gguf; "$T" --threads $N quantize "$smol" --out "$f" --scheme $t $extra --quiet --force >/dev/null
  fi
  echo "== $t $extra"
  for p in "${prompts[@]}"; do
    a=$("$B/llama-simple" -m "$f" -n 32 "$p" 2>/dev/null | sed 's/^<s> //')
    b=$("$T" --threads $N generate --model "$f" --prompt "$p" --max-tokens 32 2>/dev/null)
    python3 - "$a" "$b" <<'PY'
import sys
a, b = sys.argv[1].strip(), sys.argv[2].strip()
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"  greedy 32 tokens: {'identical' if a == b else f'first {n} of {len(a)} chars identical'} | {a[:60]!r}")
PY
  done
  [ "$t" = stories-f16 ] && continue
  lp=$("$B/llama-perplexity" -m "$f" -f "$W" -c 512 --chunks $C -t $N 2>&1 | grep -o "Final estimate: PPL = [0-9.]*" | awk '{print $NF}')
  tp=$("$T" --threads $N perplexity --model "$f" --text "$W" --ctx 512 --chunks $C --quiet | awk '{print $3}')
  python3 -c "print(f'  PPL ctx 512, $C chunks: llama.cpp {$lp:.4f}  tandem {$tp:.4f}  diff {100*($tp-$lp)/$lp:+.2f}%')"
done
