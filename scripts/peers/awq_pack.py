#!/usr/bin/env python3
"""An AWQ-layout (GEMM) checkpoint of a 16-bit Hugging Face folder, packed by AutoAWQ's own
`WQLinear_GEMM.from_linear` from min-max asymmetric 4-bit scales and zeros (no activation-aware
search): the layout AutoAWQ writes and vLLM / transformers read, for tandem's AWQ reader
(scripts/peers/interop_check.py). AutoAWQ's search itself (0.2.9, deprecated) produced a
checkpoint that its own dequantizer turns into garbage with transformers 5.17, so the layout
is made from its packer alone. MLP projections only (attention and the head stay 16-bit).

  python awq_pack.py MODEL_DIR OUT_DIR [--group-size 64]
"""
import argparse, json, os, shutil
import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("out")
ap.add_argument("--group-size", type=int, default=64)
a = ap.parse_args()

from awq.modules.linear.gemm import WQLinear_GEMM

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float16)
state = {}
g = a.group_size
for name, mod in model.named_modules():
    if not isinstance(mod, torch.nn.Linear) or ".mlp." not in name:
        continue
    w = mod.weight.data.float()
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // g, g)
    mx, mn = wg.amax(-1), wg.amin(-1)
    scales = ((mx - mn).clamp(min=1e-5) / 15).half()
    zeros = (-mn / scales.float()).round().clamp(0, 15)
    # The packer rounds w / s + z without clamping (AutoAWQ hands it weights its search has
    # already put on the grid), so it gets them on the grid too.
    s_f, z_f = scales.float()[..., None], zeros[..., None]
    levels = (wg / s_f).round().add(z_f).clamp(0, 15)
    mod.weight.data = ((levels - z_f) * s_f).reshape(out_f, in_f).half()
    # It takes scales and zeros as [groups, out].
    q = WQLinear_GEMM.from_linear(mod, 4, g, init_only=False, scales=scales.t().contiguous(),
                                  zeros=zeros.t().contiguous())
    for k in ("qweight", "qzeros", "scales"):
        state[f"{name}.{k}"] = getattr(q, k).contiguous()
for k, v in model.state_dict().items():
    if ".mlp." in k and k.endswith(".weight"):
        continue
    if k == "lm_head.weight" and model.config.tie_word_embeddings:
        continue
    state[k] = v.contiguous()
os.makedirs(a.out, exist_ok=True)
from safetensors.torch import save_file
save_file(state, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(a.model, "config.json")))
cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                              "version": "gemm", "modules_to_not_convert": ["self_attn", "lm_head"]}
json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(a.model, f)):
        shutil.copy(os.path.join(a.model, f), os.path.join(a.out, f))
print(json.dumps({"tool": "AutoAWQ WQLinear_GEMM packer", "group_size": g, "layers": sum(k.endswith('.qweight') for k in state)}))
