#!/usr/bin/env bash
# Speculative vs plain decoding on instruct prompts in SmolLM2's chat template (issue 18's
# shape), tandem beside llama.cpp in the same script, F16 verifier, same threads, greedy unless
# TEMP is set.
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin [TEMP=0.7] scripts/bench-spec-chat.sh [THREADS] [MAX_TOKENS] [PROMPTS]
# TEMP > 0 samples at that temperature with seed 1 in both tools, from the whole distribution
# (llama.cpp's top-k, top-p and min-p turned off, as tandem's defaults are), so both draw from
# the same distribution; tandem's outputs then equal its plain sampling with the seed.
# tandem: `tandem bench spec --chat` (plain and speculative on the same prompts) for the
# drafters below. llama.cpp: llama-completion (plain) and llama-speculative-simple with a Q8_0
# and a Q4_0 draft (llama-quantize of the same F16 file), tandem's GPTQ Q4_0 draft file and
# its n-gram drafters, each prompt rendered by the model's own chat template (jinja2, from
# tokenizer_config.json; special tokens parsed). tok/s = generated tokens / (prompt +
# generation time), both tools.
# Needs llama-completion and llama-speculative-simple (cmake --build BUILD --target
# llama-completion llama-speculative-simple) and python3 with jinja2.
set -euo pipefail
source "$(dirname "$0")/common.sh"
N=${1:-2}; M=${2:-128}; P=${3:-$root/scripts/chat-prompts.jsonl}; TEMP=${TEMP:-0}
mode=greedy; awk -v t="$TEMP" 'BEGIN { exit !(t + 0 == 0) }' || mode="temperature $TEMP, seed 1"
out=${OUT:-$root/target/bench-spec}; mkdir -p "$out"
echo "== tandem ($N threads, <= $M tokens, $(grep -c . "$P") chat prompts, $mode)"
# Q4_0 draft files calibrated with GPTQ on the default calibration text (never the prompts):
# what `tandem quantize` makes for its own verifier, all-Q4_0, and with the MLP of the first
# and last two layers at Q8_0 (`--edge-mlp 2=q8_0`); llama.cpp drafts with the latter below.
gptq=$out/draft-q4_0-gptq.gguf
edges=$out/draft-q4_0-gptq-edges.gguf
[ -f "$gptq" ] || "$T" --threads "$N" quantize "$smol" --out "$gptq" --scheme q4_0 --attention q4_0 \
  --method gptq --quiet >/dev/null
[ -f "$edges" ] || "$T" --threads "$N" quantize "$smol" --out "$edges" --scheme q4_0 --attention q4_0 \
  --edge-mlp 2=q8_0 --method gptq --quiet >/dev/null
for d in ngram self:q8_0@all suffix+self:q8_0@all suffix+self:q4_0@all suffix+self:q4_0@all,edges=2 \
  "suffix+$gptq" "suffix+$edges"; do
  name=${d/$gptq/gptq-q4_0.gguf}; name=${name/$edges/gptq-q4_0-edges.gguf}
  "$T" --threads "$N" bench spec --model "$smol" --chat --prompts "$P" --draft "$d" \
    --max-tokens "$M" --temperature "$TEMP" --seed 1 --json "$out/chat-$name.json" 2>/dev/null | grep -E "^[0-9]+ prompts" | sed "s/^/  [$name] /"
done
echo "== llama.cpp ($N threads, <= $M tokens, same prompts in the same template, $mode)"
[ -f "$out/f16.gguf" ] || "$T" quantize "$smol" --out "$out/f16.gguf" --scheme f16 --attention f16 --embeddings f16 --quiet >/dev/null
for q in Q8_0 Q4_0; do [ -f "$out/$q.gguf" ] || "$B/llama-quantize" "$out/f16.gguf" "$out/$q.gguf" $q "$N" >/dev/null 2>&1; done
python3 - "$B" "$out" "$N" "$M" "$P" "$smol/tokenizer_config.json" "$TEMP" <<'PY'
import json, re, subprocess, sys
import jinja2
B, out, N, M, prompts, tc, temp = sys.argv[1:8]
# Sampling at `temp` from the whole distribution (llama.cpp's default top-k 40, top-p 0.95 and
# min-p 0.05 off), as tandem samples; greedy at 0.
sampling = ["--temp", temp] + ([] if float(temp) == 0 else ["--seed", "1", "--top-k", "0", "--top-p", "1.0", "--min-p", "0.0"])
template = jinja2.Environment().from_string(json.load(open(tc))["chat_template"])
def messages(line):
    # The line shapes `tandem bench spec --chat` reads (src/prompt_file.rs): a string,
    # {"prompt"} with an optional "system", {"messages"}, or ShareGPT's {"conversations"};
    # trailing assistant turns are cut (the model writes them).
    v = json.loads(line)
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    if "messages" in v:
        ms = [{"role": t["role"], "content": t["content"]} for t in v["messages"]]
    elif "conversations" in v:
        role = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        ms = [{"role": role[t["from"]], "content": t["value"]} for t in v["conversations"]]
    else:
        ms = ([{"role": "system", "content": v["system"]}] if "system" in v else []) + [{"role": "user", "content": v["prompt"]}]
    while ms and ms[-1]["role"] == "assistant":
        ms.pop()
    return ms
ps = [template.render(messages=messages(l), add_generation_prompt=True) for l in open(prompts) if l.strip()]
def run(cmd):
    # llama.cpp prints tokens as they come: a token that ends inside a UTF-8 character leaves
    # invalid bytes in its output (only the timing lines below are read).
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr
def rate(log, plain):
    # llama-completion: llama.cpp's perf lines (prompt eval, then one eval run per token after
    # the first); speculative-simple: "encoded" (prompt) and "decoded" (generation) lines.
    if plain:
        pe = re.search(r"prompt eval time =\s*([\d.]+) ms", log)
        ev = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
        return (int(ev.group(2)) + 1, (float(pe.group(1)) + float(ev.group(1))) / 1000) if pe and ev else (0, 0.0)
    m = re.search(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s*s", log)
    e = re.search(r"encoded\s+\d+\s+tokens in\s+([\d.]+)\s*s", log)
    return (int(m.group(1)), float(m.group(2)) + (float(e.group(1)) if e else 0.0)) if m else (0, 0.0)
spec = [f"{B}/llama-speculative-simple", "-m", f"{out}/f16.gguf", "-n", M, "-t", N] + sampling
configs = [("plain (llama-completion)", True, lambda p: [f"{B}/llama-completion", "-m", f"{out}/f16.gguf", "-n", M, "-t", N] + sampling + ["-no-cnv", "-p", p])]
for q in ["Q8_0", "Q4_0"]:
    configs.append((f"spec {q} draft", False, lambda p, q=q: spec + ["-md", f"{out}/{q}.gguf", "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "-p", p]))
configs.append(("spec Q4_0 GPTQ draft (edge MLPs Q8_0)", False, lambda p: spec + ["-md", f"{out}/draft-q4_0-gptq-edges.gguf", "--spec-type", "draft-simple", "--spec-draft-n-max", "8", "-p", p]))
for t in ["ngram-simple", "ngram-map-k", "ngram-cache"]:
    configs.append((f"spec {t}", False, lambda p, t=t: spec + ["--spec-type", t, "-p", p]))
tot = {}
for name, plain, cmd in configs:
    n = s = 0
    for p in ps:
        a, b = rate(run(cmd(p)), plain)
        n += a; s += b
    tot[name] = n / s if s else float("nan")
    print(f"  {name:26s} {tot[name]:7.1f} tok/s over {n} tokens")
base = tot["plain (llama-completion)"]
best = max((v, k) for k, v in tot.items() if k.startswith("spec"))
for k, v in tot.items():
    print(f"  {k:26s} {v / base:5.2f}x its plain")
print(f"  best llama.cpp speculative: {best[1]} at {best[0]:.1f} tok/s")
PY
