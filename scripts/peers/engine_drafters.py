#!/usr/bin/env python3
"""tandem drafters inside llama-cpp-python and transformers, beside each engine alone and its
own drafter, on instruct prompts in the model's chat template (issue 19's measurement).

    python scripts/peers/engine_drafters.py --hf SMOLLM2_DIR --gguf SMOLLM2_F16.gguf \
        --prompts scripts/chat-prompts.jsonl --max-tokens 128 --threads 2 [--engines llama_cpp,transformers]

Per engine: plain decoding, the engine's own prompt lookup (llama-cpp-python's
LlamaPromptLookupDecoding, transformers' prompt_lookup_num_tokens), tandem's n-gram drafter
and tandem's self-drafts; every run's greedy text is checked against plain decoding's
(identical on every prompt, or the script says which differ), tok/s over all prompts.
"""

import argparse
import json
import sys
import time


def load_prompts(path, limit):
    out = []
    for line in open(path):
        if line.strip():
            out.append(json.loads(line)["prompt"])
    return out[:limit] if limit else out


def bench_llama_cpp(args, prompts, tandem):
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    import tandem.llama_cpp as tl

    configs = [
        ("plain", None),
        ("LlamaPromptLookupDecoding(10)", LlamaPromptLookupDecoding(num_pred_tokens=10)),
        ("tandem ngram", tl.Draft(tandem.Drafter.ngram(), num_pred_tokens=10)),
    ]
    for ty, attention in args.self_drafts:
        name = f"tandem self:{ty}{'@all' if attention else ''}"
        configs.append((name, tl.Draft(tandem.Drafter.self_draft(args.hf, ty, attention), num_pred_tokens=args.k)))
    rows, reference = [], None
    for name, draft in configs:
        llm = llama_cpp.Llama(args.gguf, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                              verbose=False, draft_model=draft)
        llm(prompts[0], max_tokens=4, temperature=0.0)  # warm-up
        texts, tokens, secs = [], 0, 0.0
        for p in prompts:
            t = time.perf_counter()
            r = llm(p, max_tokens=args.max_tokens, temperature=0.0)
            secs += time.perf_counter() - t
            texts.append(r["choices"][0]["text"])
            tokens += r["usage"]["completion_tokens"]
        if reference is None:
            reference = texts
        same = sum(a == b for a, b in zip(texts, reference))
        rows.append(("llama-cpp-python", name, tokens / secs, same))
        del llm
    return rows


def bench_transformers(args, prompts, tandem):
    import torch
    import transformers
    import tandem.transformers as tt

    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(args.hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
    configs = [("plain", {}), ("prompt_lookup_num_tokens=10", {"prompt_lookup_num_tokens": 10}),
               ("tandem ngram", {"custom_generate": tt.assisted_generate(tandem.Drafter.ngram(), 10)})]
    for ty, attention in args.self_drafts:
        name = f"tandem self:{ty}{'@all' if attention else ''}"
        d = tandem.Drafter.self_draft(args.hf, ty, attention)
        configs.append((name, {"custom_generate": tt.assisted_generate(d, args.k)}))
    inputs = [tok(p, return_tensors="pt", add_special_tokens=False) for p in prompts]
    rows, reference = [], None
    for name, kw in configs:
        model.generate(**inputs[0], max_new_tokens=4, do_sample=False, **kw)  # warm-up
        outs, tokens, secs = [], 0, 0.0
        for x in inputs:
            t = time.perf_counter()
            o = model.generate(**x, max_new_tokens=args.max_tokens, do_sample=False, **kw)
            secs += time.perf_counter() - t
            new = o[0][x["input_ids"].shape[1]:].tolist()
            outs.append(new)
            tokens += len(new)
        if reference is None:
            reference = outs
        same = sum(a == b for a, b in zip(outs, reference))
        rows.append(("transformers", name, tokens / secs, same))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True, help="the model's Hugging Face folder (F16)")
    ap.add_argument("--gguf", help="the same model as a GGUF (llama-cpp-python)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=6, help="tokens per self-draft proposal")
    ap.add_argument("--engines", default="llama_cpp,transformers")
    ap.add_argument("--self-drafts", default="q8_0@all,q4_0",
                    help="comma-separated TYPE[@all] self-drafts")
    args = ap.parse_args()
    args.self_drafts = [(s.split("@")[0], s.endswith("@all")) for s in args.self_drafts.split(",") if s]
    import tandem

    tandem.set_threads(args.threads)
    model = tandem.Model(args.hf)
    prompts = [model.apply_chat_template(q) for q in load_prompts(args.prompts, args.limit)]
    rows = []
    if "llama_cpp" in args.engines:
        rows += bench_llama_cpp(args, prompts, tandem)
    if "transformers" in args.engines:
        rows += bench_transformers(args, prompts, tandem)
    print(f"{len(prompts)} chat prompts, {args.max_tokens} tokens max, {args.threads} threads, greedy")
    print("| engine | drafter | tok/s | × plain | identical to plain |")
    print("|---|---|---:|---:|---:|")
    base = {}
    for eng, name, tps, same in rows:
        base.setdefault(eng, tps)
        print(f"| {eng} | {name} | {tps:.1f} | {tps / base[eng]:.2f}× | {same}/{len(prompts)} |")
    bad = [r for r in rows if r[3] != len(prompts)]
    if bad:
        print("differs from plain decoding:", bad, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
