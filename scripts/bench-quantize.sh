#!/usr/bin/env bash
# tandem quantize beside llama-quantize on the same F16 SmolLM2 weights and thread count.
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/bench-quantize.sh [THREADS]
# Both read an F16 GGUF that tandem writes from the F16 folder (so the input bytes are the
# same); tandem is also timed on the folder itself. Wall time by hyperfine (Debian package),
# peak RSS by /usr/bin/time -v. Throughput = F16 input bytes / wall time.
set -euo pipefail
source "$(dirname "$0")/common.sh"
N=${1:-2}
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
"$T" quantize "$smol" --out "$w/f16.gguf" --scheme f16 --attention f16 --embeddings f16 --quiet >/dev/null
in_bytes=$(stat -c %s "$w/f16.gguf")
rss() { /usr/bin/time -f %M "$@" >/dev/null 2>"$w/rss"; tail -1 "$w/rss"; }
printf "%-48s %9s %9s %9s\n" "job ($N threads)" "wall s" "MB/s" "RSS MB"
run() { # label, command...
  local label=$1; shift
  hyperfine -N -w 1 -r 5 --export-json "$w/h.json" "$*" >/dev/null 2>&1
  local t; t=$(python3 -c "import json;print(json.load(open('$w/h.json'))['results'][0]['median'])")
  local r; r=$(rss "$@")
  printf "%-48s %9.2f %9.0f %9.0f\n" "$label" "$t" "$(python3 -c "print($in_bytes/1e6/$t)")" "$(python3 -c "print($r/1024)")"
}
for t in q8_0 q4_0 q4_k; do
  L=$(echo $t | tr a-z A-Z); [ $t = q4_k ] && L=Q4_K_S
  run "llama-quantize $L" "$B/llama-quantize" "$w/f16.gguf" "$w/lc.gguf" $L $N
  run "tandem --scheme $t --attention $t (gguf in)" "$T" --threads $N quantize "$w/f16.gguf" --out "$w/t.gguf" --scheme $t --attention $t --force --quiet
  run "tandem --scheme $t (default policy)" "$T" --threads $N quantize "$smol" --out "$w/t.gguf" --scheme $t --force --quiet
done
