#!/usr/bin/env python3
"""Checks tandem against the libraries that write and serve GPTQ / AWQ / compressed-tensors
checkpoints (issue 17). Not part of CI: needs torch (CPU), transformers, compressed-tensors,
llmcompressor (and gptqmodel / autoawq for those layouts) in a virtual environment, and the
llama.cpp peer for the GGUF step.

For every checkpoint folder given (and tandem's own compressed-tensors export, made here):
  1. greedy text: 12 instruct prompts in the model's chat template, 32 new tokens, run by the
     library (float32 on the CPU) and by `tandem generate --logprobs --activations f32`:
     the token sequences must be identical; the largest difference between the two engines'
     log-probabilities of the chosen tokens is reported;
  2. perplexity on wikitext-2 (ctx 512, llama-perplexity's chunking, --chunks N) by the library
     and by `tandem perplexity --activations f32`: relative difference reported (≤ 0.5%);
  3. `tandem quantize DIR --out DIR.gguf` (lossless by default): every quantized layer of the
     GGUF decoded by llama.cpp's own gguf-py against the library's dequantized weights —
     bit-exact (or within the stated f16 rounding of the offset for asymmetric grids);
  4. llama.cpp runs that GGUF (llama-perplexity when built, else llama-bench).

  python interop_check.py --tandem target/release/tandem --model SMOLLM2_F16_DIR \
      --text wiki.test.raw --work target/interop --llama-bin LLAMA_BIN \
      [--checkpoint llmc-gptq=DIR ...] [--chunks 8]
Prints one JSON line per checkpoint and a Markdown table at the end.
"""
import argparse, json, os, subprocess, sys, time

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "How do I boil an egg so the yolk stays soft?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "What are the main causes of inflation?",
    "Write a short, friendly email declining a meeting invitation.",
    "Why do cats purr?",
    "List the planets of the solar system in order from the sun.",
]

# SmolLM2-Instruct's chat template (ChatML with its default system prompt), for folders whose
# tokenizer_config.json carries none (tandem convert's output from the GGUF).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

ap = argparse.ArgumentParser()
ap.add_argument("--tandem", required=True)
ap.add_argument("--model", required=True, help="the 16-bit Hugging Face folder (SmolLM2)")
ap.add_argument("--text", required=True)
ap.add_argument("--work", required=True)
ap.add_argument("--llama-bin", default=None)
ap.add_argument("--checkpoint", action="append", default=[], help="LABEL=DIR of a third-party checkpoint")
ap.add_argument("--chunks", type=int, default=8)
ap.add_argument("--tokens", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--skip-export", action="store_true")
ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
ap.add_argument("--only-export", action="append", default=[], help="export only these variants (e.g. tandem-q4_0-rtn)")
a = ap.parse_args()
PROMPTS = PROMPTS[: a.prompts]

import numpy as np
import torch
torch.set_num_threads(a.threads)
from transformers import AutoModelForCausalLM, AutoTokenizer

os.makedirs(a.work, exist_ok=True)
env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))


def tandem(*args, check=True):
    r = subprocess.run([a.tandem, *args], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        sys.exit(f"tandem {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def load_reference(path):
    """The checkpoint as the library that writes it runs it, in float32, weights dequantized."""
    cfg = json.load(open(os.path.join(path, "config.json")))
    method = cfg.get("quantization_config", {}).get("quant_method")
    if method == "compressed-tensors":
        from transformers import CompressedTensorsConfig
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
        return m, "transformers + compressed-tensors (decompressed, float32)"
    if method == "gptq":
        # GPTQModel's CPU kernel runs in float16/bfloat16 only; the reference is its own
        # dequantizer (`dequantize_weight`, scales in float32 so the products are exact) over
        # every packed layer, the other tensors as it loaded them, run by transformers in float32.
        from gptqmodel import GPTQModel, BACKEND
        from transformers import AutoConfig
        g = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        conf = AutoConfig.from_pretrained(path)
        if hasattr(conf, "quantization_config"):
            del conf.quantization_config
        m = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        for name, mod in g.model.named_modules():
            if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
                mod.scales = mod.scales.float()
                m.get_submodule(name).weight.data = mod.dequantize_weight().T.float().contiguous()
        own = dict(m.named_parameters())
        for name, p in g.model.named_parameters():
            if name in own:
                own[name].data = p.detach().float()
        if conf.tie_word_embeddings:
            m.tie_weights()
        return m, "GPTQModel dequantize_weight + transformers (float32)"
    if method == "awq":
        # AutoAWQ 0.2.9 cannot load models with transformers 5 (its last tested version is
        # 4.51), so the reference is AutoAWQ's own dequantizer (`dequantize_gemm`) over every
        # packed layer, the other tensors as stored, run by transformers.
        from awq.utils.packing_utils import dequantize_gemm
        from safetensors.torch import load_file
        from transformers import AutoConfig
        conf = AutoConfig.from_pretrained(path)
        qc = cfg["quantization_config"]
        if hasattr(conf, "quantization_config"):
            del conf.quantization_config
        m = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        sd = load_file(os.path.join(path, "model.safetensors"))
        for k, v in sd.items():
            if k.endswith(".qweight"):
                mod = k[: -len(".qweight")]
                w = dequantize_gemm(v, sd[mod + ".qzeros"], sd[mod + ".scales"], qc["bits"], qc["group_size"])
                m.get_submodule(mod).weight.data = w.T.float().contiguous()
            elif not k.endswith((".qzeros", ".scales")):
                m.get_parameter(k).data = v.float()
        if conf.tie_word_embeddings:
            m.tie_weights()
        return m, "AutoAWQ dequantize_gemm + transformers (float32)"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "transformers (float32)"


def dequantized_linears(model):
    """name → float32 weight of every quantized MLP linear, as the library computes with it."""
    out = {}
    for name, mod in model.named_modules():
        if not name.endswith(("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        w = None
        if hasattr(mod, "weight"):
            w = mod.weight
        if w is not None:
            out[name + ".weight"] = w.detach().float().cpu().numpy()
    return out


def greedy_compare(model, tok, path):
    same, max_dlp, rows = 0, 0.0, []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                       chat_template=None if tok.chat_template else CHATML)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        ref = out.sequences[0, ids.shape[1]:].tolist()
        ref_lp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ref)]
        eos = set([tok.eos_token_id] + ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else list(model.generation_config.eos_token_id or [])))
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        ref, ref_lp = ref[:cut], ref_lp[:cut]
        r = tandem("generate", "--model", path, "--prompt", text, "--max-tokens", str(a.tokens),
                   "--activations", "f32", "--logprobs", "--threads", str(a.threads))
        stats = json.loads(r.stderr.strip().splitlines()[-1])
        if stats["prompt_tokens"] != ids.shape[1]:
            sys.exit(f"prompt tokenized differently: tandem {stats['prompt_tokens']} vs {ids.shape[1]} tokens")
        got, got_lp = stats["tokens"], stats["logprobs"]
        n = min(len(got), len(ref))
        if got == ref:
            same += 1
        d = max((abs(x - y) for x, y in zip(got_lp[:n], ref_lp[:n])), default=0.0)
        max_dlp = max(max_dlp, d)
        rows.append({"prompt": p, "identical": got == ref, "tokens": len(ref), "max_abs_dlogprob": round(d, 5)})
    return same, max_dlp, rows


def perplexity_reference(model, tok):
    # newline="": the text exactly as tandem and llama-perplexity read it (wikitext-2 has CRLF).
    ids = tok(open(a.text, encoding="utf-8", newline="").read(), add_special_tokens=False)["input_ids"]
    ctx, first = 512, 256
    total, count = 0.0, 0
    for c in range(min(a.chunks, len(ids) // ctx)):
        chunk = torch.tensor([ids[c * ctx:(c + 1) * ctx]])
        with torch.no_grad():
            lp = torch.log_softmax(model(chunk).logits[0].float(), -1)
        tgt = chunk[0, first + 1:]
        total -= lp[first:ctx - 1].gather(1, tgt[:, None]).sum().item()
        count += tgt.numel()
    return float(np.exp(total / count))


def perplexity_tandem(path):
    r = tandem("perplexity", "--model", path, "--text", a.text, "--chunks", str(a.chunks),
               "--activations", "f32", "--threads", str(a.threads), "-q")
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("PPL = "):
            return float(line.split()[2])
    sys.exit(f"no perplexity in tandem's output: {r.stdout} {r.stderr}")


def gguf_exactness(gguf_path, weights):
    """Decodes every quantized MLP tensor of the GGUF with llama.cpp's gguf-py and compares."""
    # llama.cpp's gguf-py beside its build folder (LLAMA_BIN = <llama.cpp>/build-*/bin).
    sys.path.insert(0, os.path.abspath(os.path.join(a.llama_bin, "..", "..", "gguf-py")))
    import gguf
    from gguf.quants import dequantize
    rd = gguf.GGUFReader(gguf_path)
    hf = {}
    for t in rd.tensors:
        parts = t.name.split(".")
        # q/k rows are in llama.cpp's RoPE order in a GGUF: compared are the layers whose rows
        # are not reordered (every MLP projection, v and o).
        names = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
            hf[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = t
    exact, compared, worst, types = 0, 0, 0.0, {}
    for name, w in weights.items():
        t = hf.get(name)
        if t is None or t.tensor_type.name in ("F16", "BF16"):
            continue
        compared += 1
        got = dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float32)
        d = float(np.abs(got - w).max())
        exact += d == 0.0
        worst = max(worst, d)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return exact, compared, worst, types


def llama_runs(gguf_path):
    if not a.llama_bin:
        return None
    ppl = os.path.join(a.llama_bin, "llama-perplexity")
    if os.path.exists(ppl):
        r = subprocess.run([ppl, "-m", gguf_path, "-f", a.text, "-c", "512", "--chunks", str(a.chunks),
                            "-t", str(a.threads)], capture_output=True, text=True)
        for line in r.stdout.splitlines() + r.stderr.splitlines():
            if "Final estimate: PPL" in line:
                return {"tool": "llama-perplexity", "ppl": float(line.split("=")[1].split()[0])}
        return {"tool": "llama-perplexity", "error": r.stderr.strip().splitlines()[-1:]}
    r = subprocess.run([os.path.join(a.llama_bin, "llama-bench"), "-m", gguf_path, "-p", "0", "-n", "16",
                        "-t", str(a.threads), "-o", "json"], capture_output=True, text=True)
    return {"tool": "llama-bench", "ok": r.returncode == 0,
            "tg_tok_s": json.loads(r.stdout)[0]["avg_ts"] if r.returncode == 0 else None}


checkpoints = []
if not a.skip_export:
    for label, extra in [("tandem-q4_0-rtn", []), ("tandem-q4_0-gptq", ["--method", "gptq"]),
                         ("tandem-q4_1-asym-rtn", ["--scheme", "q4_1"]),
                         ("tandem-q4_0-rtn-g64", ["--group-size", "64"]),
                         ("tandem-q4_0-down-q8_0", ["--rule", "mlp\\.down_proj=q8_0"]),
                         ("tandem-q8_0-rtn", ["--scheme", "q8_0"])]:
        if a.only_export and label not in a.only_export:
            continue
        out = os.path.join(a.work, label)
        scheme = [] if "--scheme" in extra else ["--scheme", "q4_0"]
        t0 = time.time()
        tandem("quantize", a.model, "--out", out, "--format", "compressed-tensors", *scheme, *extra,
               "--force", "-q")
        print(f"exported {label} in {time.time() - t0:.1f} s", file=sys.stderr)
        checkpoints.append((label, out))

checkpoints += [c.split("=", 1) for c in a.checkpoint]
results = []
for label, path in checkpoints:
    t0 = time.time()
    model, engine = load_reference(path)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    same, max_dlp, rows = greedy_compare(model, tok, path)
    ppl_ref = perplexity_reference(model, tok)
    ppl_tandem = perplexity_tandem(path)
    gguf_path = os.path.join(a.work, label + ".gguf")
    tandem("quantize", path, "--out", gguf_path, "--force", "-q")
    info = tandem("info", path).stdout
    exact, n, worst, types = gguf_exactness(gguf_path, dequantized_linears(model))
    res = {
        "checkpoint": label, "engine": engine,
        "held_as": [l.strip() for l in info.splitlines() if "layers held as" in l],
        "greedy_identical": f"{same}/{len(PROMPTS)}", "max_abs_dlogprob": round(max_dlp, 5),
        "ppl_reference": round(ppl_ref, 4), "ppl_tandem": round(ppl_tandem, 4),
        "ppl_rel_diff_pct": round(100 * (ppl_tandem / ppl_ref - 1), 3),
        "gguf_exact_layers": f"{exact}/{n}", "gguf_max_abs_diff": worst, "gguf_types": types,
        "llama_cpp": llama_runs(gguf_path), "seconds": round(time.time() - t0, 1),
        "prompts": rows,
    }
    print(json.dumps(res), flush=True)
    results.append(res)
    del model

print("\n| checkpoint | reference engine | held by tandem as | greedy identical | max Δlogprob | PPL ref | PPL tandem | Δ | GGUF layers bit-exact | llama.cpp on the GGUF |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    lc = r["llama_cpp"] or {}
    lcs = f"PPL {lc['ppl']}" if "ppl" in lc else (f"{lc.get('tool')}: runs, {lc.get('tg_tok_s', 0):.0f} tok/s" if lc.get("ok") else str(lc))
    print(f"| {r['checkpoint']} | {r['engine']} | {'; '.join(r['held_as'])} | {r['greedy_identical']} | {r['max_abs_dlogprob']} "
          f"| {r['ppl_reference']} | {r['ppl_tandem']} | {r['ppl_rel_diff_pct']}% | {r['gguf_exact_layers']} (max diff {r['gguf_max_abs_diff']:.2g}) | {lcs} |")
