#!/usr/bin/env bash
# The GPU check (issue 6): the GPU tests, then one table of plain and speculative tok/s on the
# GPU (the whole forward pass there) beside the CPU, and the kernels' GB/s against the device's
# measured read bandwidth. Made to finish in well under 8 minutes on a fresh GPU machine with
# no network.
#
#   scripts/gpu-bundle.sh      # here: build the binaries with --features cuda (needs Rust)
#   scripts/gpu-check.sh       # there: runs target/gpu-bundle's binaries (or builds them
#                              # with cargo where there is a toolchain and no bundle)
#   SYNTH=0 scripts/gpu-check.sh   # without the synthetic ~0.8B model (needs python3 + numpy)
#   SMOLLM2=DIR scripts/gpu-check.sh  # also SmolLM2-135M-Instruct (F16 folder) on chat prompts
#                                   # (scripts/gpu-pack-smollm2.sh carries it in pieces)
#   GPU_CHECK_OUT=DIR               # keep each `bench spec` JSON there
#
# Every GPU pass of up to 8 rows runs from a CUDA graph unless TANDEM_CUDA_GRAPHS=0; the
# decode and verification timings are taken both ways.
#
# Without a GPU every step says "skipped" and the script still exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
say() { echo "[gpu-check +$(($(date +%s) - start))s] $*" >&2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2

# cudarc opens libcuda and libnvrtc at run time. A CUDA 13 toolkit ships libnvrtc.so.13,
# a name cudarc does not try: link it as libnvrtc.so in a private folder.
libs=$(mktemp -d)
tmp=$(mktemp -d)
trap 'rm -rf "$libs" "$tmp"' EXIT
nvrtc=$( (ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF}';
          ls /usr/local/cuda*/lib64/libnvrtc.so* /usr/local/cuda*/targets/*/lib/libnvrtc.so* 2>/dev/null;
          python3 -c 'import nvidia, os; [print(os.path.join(r, f)) for p in nvidia.__path__ for r, _, fs in os.walk(p) for f in fs if f.startswith("libnvrtc.so")]' 2>/dev/null) \
        | grep -v builtins | head -1)
if [ -n "$nvrtc" ]; then
  ln -sf "$nvrtc" "$libs/libnvrtc.so"
  export LD_LIBRARY_PATH="$libs:$(dirname "$nvrtc"):/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
  say "NVRTC: $nvrtc"
else
  say "NVRTC not found (GPU steps will say skipped)"
fi

B=target/gpu-bundle
if [ ! -x $B/tandem ] && command -v cargo >/dev/null; then
  say "no bundle: building it (--features cuda)"
  bash scripts/gpu-bundle.sh >&2 || say "build failed"
fi
[ -x $B/tandem ] || { say "skipped: no binaries (run scripts/gpu-bundle.sh where Rust is)"; exit 0; }
say "binaries of commit $(cat $B/COMMIT 2>/dev/null || echo '?')"
T=$B/tandem
export TANDEM_ROOT=$PWD TANDEM_BIN=$PWD/$T

say "GPU tests"
for t in "test-kernels-lib cuda" test-kernels-gpu test-gpu; do
  $B/$t --test-threads 1 --nocapture 2>&1 | grep -E "^test |test result|skipped|panicked|FAILED" >&2
done

model=models/stories260K
prompt="Once upon a time"
say "greedy text: GPU vs CPU (f32 activations)"
a=$($T --activations f32 generate --model $model --prompt "$prompt" --max-tokens 64 2>/dev/null)
if b=$($T --gpu generate --model $model --prompt "$prompt" --max-tokens 64 2>"$tmp/err"); then
  if [ "$a" = "$b" ]; then say "same text on GPU and CPU"; else say "TEXT DIFFERS"; echo "cpu: $a" >&2; echo "gpu: $b" >&2; fi
else
  say "skipped: tandem --gpu did not start: $(tail -1 "$tmp/err")"
fi

rows=()
runs=0
# SPEC_ARGS: more `bench spec` flags (--chat); GRAPHS=0: no CUDA graphs.
run_spec() { # where, model, draft, max-tokens, prompts, global flags...
  local where=$1 m=$2 draft=$3 n=$4 prompts=$5; shift 5
  local j=$tmp/spec.json
  rm -f "$j"
  runs=$((runs + 1))
  # shellcheck disable=SC2086
  if TANDEM_CUDA_GRAPHS=${GRAPHS:-1} timeout 240 $T "$@" bench spec --model "$m" --draft "$draft" --max-tokens "$n" \
      --prompts "$prompts" --json "$j" ${SPEC_ARGS:-} >"$tmp/spec.out" 2>"$tmp/err"; then
    grep -E "identical|where the time went" -A2 "$tmp/spec.out" | sed "s/^/  [$where $draft] /" >&2
    [ -n "${GPU_CHECK_OUT:-}" ] && mkdir -p "$GPU_CHECK_OUT" && cp "$j" "$GPU_CHECK_OUT/spec-$runs.json"
    rows+=("| $where | $(basename "$m") | $draft | $(python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))['total']
print(f\"{d['plain_tok_s']:.1f} | {d['spec_tok_s']:.1f} | {d['speedup']:.2f}x | {100 * d['acceptance_rate']:.0f}%\")" "$j" 2>/dev/null || echo "n/a | n/a | n/a | n/a") |")
  else
    rows+=("| $where | $(basename "$m") | $draft | skipped: $(tail -1 "$tmp/err" | cut -c1-80) | | | |")
  fi
}
head -6 scripts/spec-prompts.jsonl >"$tmp/prompts.jsonl"
# QUICK=1 leaves out the runs on models whose drafts say little (stories260K, random weights).
[ "${QUICK:-0}" = 1 ] || for draft in ngram self:q8_0; do
  say "bench spec on $model, $draft (CPU, GPU)"
  run_spec "CPU" $model $draft 128 "$tmp/prompts.jsonl"
  run_spec "GPU" $model $draft 128 "$tmp/prompts.jsonl" --gpu
done
# `bench` (prefill, decode, passes of 1 and 8 rows after 256 positions) on the GPU with CUDA
# graphs on and off, in that order, into a file: model, decode tokens, file, graph settings.
bench_graphs() {
  local m=$1 tg=$2 out=$3 gr; shift 3
  for gr in "$@"; do
    echo "TANDEM_CUDA_GRAPHS=$gr" >>"$out"
    TANDEM_CUDA_GRAPHS=$gr timeout 120 $T --gpu bench --model "$m" --pp 128 --tg "$tg" --reps 3 --verify 8 --context 256 \
      >>"$out" 2>"$tmp/err" || echo "bench (graphs $gr): $(tail -1 "$tmp/err")" >>"$out"
  done
}

# SmolLM2-135M-Instruct, F16 (issue 18's verifier), on the team's chat prompts in its own
# template: the real model, where it was carried in (its 270 MB travel in several calls).
if [ -n "${SMOLLM2:-}" ] && [ -f "$SMOLLM2/model.safetensors" ]; then
  say "SmolLM2: decode and passes of 1 and 8 rows on the GPU, CUDA graphs on, then off"
  bench_graphs "$SMOLLM2" 128 "$tmp/smol.md" 1 0
  cat "$tmp/smol.md" >&2
  say "SmolLM2: bench spec --chat, 16 instruct prompts, <= 128 tokens, greedy"
  for draft in suffix+self:q4_0@all self:q4_0@all self:q8_0@all suffix ngram; do
    SPEC_ARGS=--chat run_spec "GPU" "$SMOLLM2" $draft 128 scripts/chat-prompts.jsonl --gpu
  done
  SPEC_ARGS=--chat GRAPHS=0 run_spec "GPU, no graphs" "$SMOLLM2" suffix 128 scripts/chat-prompts.jsonl --gpu
  SPEC_ARGS=--chat GRAPHS=0 run_spec "GPU, no graphs" "$SMOLLM2" suffix+self:q4_0@all 128 scripts/chat-prompts.jsonl --gpu
  SPEC_ARGS=--chat run_spec "GPU" "$SMOLLM2" suffix 128 scripts/chat-prompts-multiturn.jsonl --gpu
  SPEC_ARGS=--chat run_spec "CPU, $(nproc) threads" "$SMOLLM2" suffix+self:q4_0@all 128 scripts/chat-prompts.jsonl
fi
# A model big enough to load the GPU: random F16 weights (meaningless text, real shapes).
if [ "${SYNTH:-1}" = 1 ] && python3 -c 'import numpy' 2>/dev/null; then
  synth=$tmp/synth-0.8B
  say "synthetic ~0.8B F16 model (16 layers, hidden 2048)"
  python3 scripts/synthetic-checkpoint.py "$synth" --layers 16 --hidden 2048 --ffn 5632 --heads 16 --kv-heads 8 \
    --tokenizer $model/tokenizer.json --vocab 512 >&2
  head -3 scripts/spec-prompts.jsonl >"$tmp/p3.jsonl"
  [ "${QUICK:-0}" = 1 ] || for draft in self:q8_0 ngram; do
    run_spec "GPU" "$synth" $draft 64 "$tmp/p3.jsonl" --gpu
  done
  # Issue 18's verification cost on the GPU: a pass of 8 rows against a 1-row pass (F16, Q8_0).
  say "decode, and verification passes of 1 and 8 rows, on the GPU (synthetic model, F16; graphs off, then on)"
  bench_graphs "$synth" 64 "$tmp/verify.md" 0 1
  say "the same in Q8_0 (attention too)"
  if timeout 120 $T quantize "$synth" --scheme q8_0 --attention q8_0 --out "$tmp/synth-q8_0.gguf" >/dev/null 2>"$tmp/err"; then
    echo "Q8_0:" >>"$tmp/verify.md"
    bench_graphs "$tmp/synth-q8_0.gguf" 64 "$tmp/verify.md" 1
  else
    echo "quantize: $(tail -1 "$tmp/err")" >>"$tmp/verify.md"
  fi
fi

echo
echo "## tandem GPU check ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'), binaries of $(cat $B/COMMIT 2>/dev/null))"
echo
echo "| where | model | draft | plain tok/s | speculative tok/s | speedup | accepted |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
[ -f "$tmp/verify.md" ] && { cat "$tmp/verify.md"; echo; }
[ -f "$tmp/smol.md" ] && { echo "SmolLM2-135M-Instruct F16:"; cat "$tmp/smol.md"; echo; }
$B/gpu_bench
say "done"
