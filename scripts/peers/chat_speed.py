"""Plain (non-speculative) generation speed on instruct prompts in the chat template:
llama-cpp-python create_chat_completion beside `tandem generate --chat`, same GGUF, 2 threads,
greedy, 128 tokens at most. Peer tool, not part of CI:
    TANDEM_VENV python scripts/peers/chat_speed.py FILE.gguf scripts/chat-prompts.jsonl target/release/tandem
"""
import json, sys, time, subprocess
from llama_cpp import Llama
gguf, prompts_path, tandem = sys.argv[1], sys.argv[2], sys.argv[3]
prompts = [json.loads(l) for l in open(prompts_path) if l.strip()]
def text(p): return p.get("prompt") or p.get("text") or p["messages"][-1]["content"]
llm = Llama(model_path=gguf, n_threads=2, n_ctx=2048, verbose=False)
lc_tok = lc_t = 0.0; td_tok = td_t = 0.0
for p in prompts:
    q = text(p)
    t0 = time.perf_counter()
    r = llm.create_chat_completion(messages=[{"role": "user", "content": q}], max_tokens=128, temperature=0.0)
    dt = time.perf_counter() - t0
    n = r["usage"]["completion_tokens"]
    lc_tok += n; lc_t += dt
    out = subprocess.run([tandem, "--threads", "2", "generate", "--model", gguf, "--chat", "--prompt", q,
                          "--max-tokens", "128", "--json"], capture_output=True, text=True)
    j = json.loads(out.stderr.strip().splitlines()[-1])
    td_tok += j["generated_tokens"]; td_t += j["generated_tokens"] / j["decode_tok_s"] + j["time_to_first_token_s"]
print(f"{len(prompts)} chat prompts, {gguf}: llama-cpp-python {lc_tok:.0f} tokens in {lc_t:.2f} s = {lc_tok/lc_t:.1f} tok/s (prompt+answer wall); tandem {td_tok:.0f} tokens in {td_t:.2f} s = {td_tok/td_t:.1f} tok/s (first-token + decode time); ratio {td_tok/td_t/(lc_tok/lc_t):.2f}x")
