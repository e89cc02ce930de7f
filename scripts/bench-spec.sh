#!/usr/bin/env bash
# Speculative vs plain decoding, tandem beside llama.cpp, SmolLM2-135M F16 verifier.
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin scripts/bench-spec.sh [THREADS] [MAX_TOKENS]
# tandem: `tandem bench spec` over the 18 default prompts (scripts/spec-prompts.jsonl) for the
# drafters self:q8_0@all (llama.cpp's Q8_0 file: the same pair as its Q8_0 draft), self:q8_0,
# self:q4_0 and ngram, at temperature 0 and 0.7; then batches of 1/2/4.
# llama.cpp: llama-completion -t THREADS (plain) and llama-speculative-simple with Q8_0 / Q4_0
# drafts of the same F16 model (made by llama-quantize), same prompts, greedy, same threads.
# llama-simple is printed too but is not the baseline: it takes no thread option and runs
# llama.cpp's default of 4 threads, which on a 2-core machine decodes ~25% slower.
set -euo pipefail
source "$(dirname "$0")/common.sh"
N=${1:-2}; M=${2:-128}
out=${OUT:-$root/target/bench-spec}; mkdir -p "$out"
if [ -z "${SKIP_TANDEM:-}" ]; then
echo "== tandem ($N threads, $M tokens, 18 prompts)"
for temp in 0 0.7; do
  for d in self:q8_0@all self:q8_0 self:q4_0 ngram; do
    "$T" --threads $N bench spec --model "$smol" --draft $d --max-tokens $M --temperature $temp --seed 1 \
      --json "$out/tandem-$d-$temp.json" 2>/dev/null | sed "s/^/  /"
  done
done
for b in 1 2 4; do
  for d in ngram self:q4_0; do
    "$T" --threads $N bench spec --model "$smol" --draft $d --max-tokens 64 --batch $b --spec-max-batch 64 2>/dev/null || true
  done
done
fi
echo "== llama.cpp ($N threads, $M tokens, greedy)"
[ -f "$out/f16.gguf" ] || "$T" quantize "$smol" --out "$out/f16.gguf" --scheme f16 --attention f16 --embeddings f16 --quiet >/dev/null
for q in Q8_0 Q4_0; do [ -f "$out/$q.gguf" ] || "$B/llama-quantize" "$out/f16.gguf" "$out/$q.gguf" $q $N >/dev/null 2>&1; done
python3 - "$B" "$out" "$N" "$M" "$root/scripts/spec-prompts.jsonl" <<'PY'
import json, re, subprocess, sys, time
B, out, N, M, prompts = sys.argv[1:6]
ps = [json.loads(l)["prompt"] for l in open(prompts) if l.strip()]
def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr
def decode_rate(log, key):
    # Tokens and seconds including the prompt, as tandem bench spec times both sides:
    # llama-simple's "decoded N tokens in S s" already includes the prompt; speculative-simple
    # reports the prompt ("encoded ... in S seconds") and generation ("decoded ...") apart;
    # llama-completion prints llama.cpp's perf lines (prompt eval, then one eval run per token
    # after the first).
    pe = re.search(r"prompt eval time =\s*([\d.]+) ms", log)
    ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    if key.startswith("plain (llama-completion") and pe and ev:
        return (int(ev.group(2)) + 1, (float(pe.group(1)) + float(ev.group(1))) / 1000)
    m = re.search(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s*s", log)
    e = re.search(r"encoded\s+\d+\s+tokens in\s+([\d.]+)\s*s", log)
    if not m:
        return (0, 0.0)
    return (int(m.group(1)), float(m.group(2)) + (float(e.group(1)) if e else 0.0))
tot = {}
for name, cmd in [("plain (llama-completion)", lambda p: [f"{B}/llama-completion", "-m", f"{out}/f16.gguf", "-n", M, "-t", N, "--temp", "0", "-no-cnv", "-p", p]),
                  ("llama-simple (4 thr.)", lambda p: [f"{B}/llama-simple", "-m", f"{out}/f16.gguf", "-n", M, p]),
                  ("spec Q8_0 draft", lambda p: [f"{B}/llama-speculative-simple", "-m", f"{out}/f16.gguf", "-md", f"{out}/Q8_0.gguf", "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "-n", M, "-t", N, "--temp", "0", "-p", p]),
                  ("spec Q4_0 draft", lambda p: [f"{B}/llama-speculative-simple", "-m", f"{out}/f16.gguf", "-md", f"{out}/Q4_0.gguf", "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "-n", M, "-t", N, "--temp", "0", "-p", p])]:
    n = s = 0
    acc = []
    for p in ps:
        log = run(cmd(p))
        a, b = decode_rate(log, name)
        n += a; s += b
        m = re.search(r"accept\s*=\s*([\d.]+)%", log)
        if m: acc.append(float(m.group(1)))
    tot[name] = n / s if s else float("nan")
    extra = f", mean acceptance {sum(acc)/len(acc):.1f}%" if acc else ""
    print(f"  {name:22s} {tot[name]:7.1f} tok/s over {n} tokens{extra}")
base = tot["plain (llama-completion)"]
for k, v in tot.items():
    print(f"  {k:22s} {v / base:5.2f}x plain")
PY
