#!/usr/bin/env python3
"""llm-compressor's GPTQ W4A16 (group 32, symmetric) of a Hugging Face folder, for comparison
with `tandem quantize --method gptq`: same calibration text and chunking (512-token chunks of
the text, each starting with BOS), attention and the output head kept 16-bit. Writes the
dequantized weights as an F16 Hugging Face folder that `tandem eval` reads, and prints the time
of llm-compressor's own work (oneshot). Not part of CI (needs torch, transformers,
llmcompressor from PyPI; see scripts/bench-calibrated.sh).

  python llmcompressor_gptq.py MODEL_DIR CALIB.txt OUT_DIR [--actorder static|group|weight|none]
                               [--observer minmax|mse] [--threads N] [--compressed]

With --compressed, OUT_DIR is llm-compressor's own compressed-tensors checkpoint
(save_pretrained(save_compressed=True): pack-quantized int4), the folder vLLM serves and
`tandem` reads (scripts/peers/interop_check.py).
"""
import argparse, json, os, shutil, time

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("calib"); ap.add_argument("out")
ap.add_argument("--actorder", default="static")
ap.add_argument("--observer", default="minmax")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--compressed", action="store_true")
ap.add_argument("--dtype", default="float32", help="float16 for a checkpoint as users make it (f16 scales)")
a = ap.parse_args()

import torch
torch.set_num_threads(a.threads)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype))
ids = tok(open(a.calib, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
bos = tok.bos_token_id
chunks = []
for c in range(len(ids) // a.ctx):
    chunk = ids[c * a.ctx:(c + 1) * a.ctx]
    if bos is not None:
        chunk = [bos] + chunk[1:]
    chunks.append({"input_ids": chunk, "attention_mask": [1] * len(chunk)})
ds = Dataset.from_list(chunks)

weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
           "group_size": 32, "observer": a.observer}
if a.actorder != "none":
    weights["actorder"] = a.actorder
recipe = GPTQModifier(
    config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
    ignore=["lm_head", "re:.*self_attn.*"],
)
t0 = time.time()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.ctx,
        num_calibration_samples=len(chunks))
seconds = time.time() - t0

if a.compressed:
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"tool": "llmcompressor", "actorder": a.actorder, "observer": a.observer,
                      "chunks": len(chunks), "format": "compressed-tensors",
                      "oneshot_seconds": round(seconds, 1)}))
    raise SystemExit(0)

# Dequantize every quantized Linear with its own scales (fake quantization = the values a
# serving engine computes with) and save an F16 folder.
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
n = 0
with torch.no_grad():
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        m.weight.data = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point,
                                      scheme.weights)
        n += 1
os.makedirs(a.out, exist_ok=True)
state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()
         if not any(s in k for s in ("weight_scale", "weight_zero_point", "weight_g_idx", "quantization"))}
from safetensors.torch import save_file
if "lm_head.weight" in state and model.config.tie_word_embeddings:
    del state["lm_head.weight"]
save_file(state, os.path.join(a.out, "model.safetensors"))
for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    if os.path.exists(os.path.join(a.model, f)):
        shutil.copy(os.path.join(a.model, f), os.path.join(a.out, f))
cfg = json.load(open(os.path.join(a.out, "config.json")))
cfg.pop("quantization_config", None); cfg["torch_dtype"] = "float16"
json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=1)
print(json.dumps({"tool": "llmcompressor", "actorder": a.actorder, "observer": a.observer,
                  "chunks": len(chunks), "quantized_linears": n, "oneshot_seconds": round(seconds, 1)}))
