#!/usr/bin/env python3
"""Writes a synthetic sharded Hugging Face Llama checkpoint of random F16 weights, for
memory and speed tests at scale only (its outputs are meaningless text).

    scripts/synthetic-checkpoint.py OUT_DIR [--layers 28] [--hidden 3072] [--ffn 8192]

Defaults give ~3.1B parameters, ~6.3 GB in 2 GB shards, vocabulary and tokenizer of SmolLM2
(taken from ../shared/models/smollm2-135m-instruct). Needs numpy.
"""
import argparse, json, os, shutil, struct, sys
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--layers", type=int, default=28)
ap.add_argument("--hidden", type=int, default=3072)
ap.add_argument("--ffn", type=int, default=8192)
ap.add_argument("--heads", type=int, default=24)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--shard-gb", type=float, default=2.0)
# Another tokenizer.json and its vocabulary size (scripts/gpu-check.sh uses the bundled
# stories260K's, 512, where ../shared is not there).
ap.add_argument("--tokenizer")
ap.add_argument("--vocab", type=int, default=49152)
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tok_dir = os.path.join(root, "..", "shared", "models", "smollm2-135m-instruct")
tokenizer = a.tokenizer or os.path.join(tok_dir, "tokenizer.json")
vocab = a.vocab
os.makedirs(a.out, exist_ok=True)
hd = a.hidden // a.heads
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": a.hidden, "intermediate_size": a.ffn, "num_hidden_layers": a.layers,
    "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "vocab_size": vocab,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}
json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=1)
shutil.copy(tokenizer, os.path.join(a.out, "tokenizer.json"))

tensors = [("model.embed_tokens.weight", (vocab, a.hidden))]
for l in range(a.layers):
    p = f"model.layers.{l}."
    tensors += [
        (p + "input_layernorm.weight", (a.hidden,)),
        (p + "self_attn.q_proj.weight", (a.heads * hd, a.hidden)),
        (p + "self_attn.k_proj.weight", (a.kv_heads * hd, a.hidden)),
        (p + "self_attn.v_proj.weight", (a.kv_heads * hd, a.hidden)),
        (p + "self_attn.o_proj.weight", (a.hidden, a.heads * hd)),
        (p + "post_attention_layernorm.weight", (a.hidden,)),
        (p + "mlp.gate_proj.weight", (a.ffn, a.hidden)),
        (p + "mlp.up_proj.weight", (a.ffn, a.hidden)),
        (p + "mlp.down_proj.weight", (a.hidden, a.ffn)),
    ]
tensors += [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (vocab, a.hidden))]

# A 64 MiB pool of random small F16 values, sliced at varying offsets (fast, finite).
rng = np.random.default_rng(0)
pool = (rng.standard_normal(32 << 20, dtype=np.float32) * 0.02).astype(np.float16)

shards, cur, size = [], [], 0
limit = int(a.shard_gb * (1 << 30))
for name, shape in tensors:
    n = int(np.prod(shape)) * 2
    if cur and size + n > limit:
        shards.append(cur); cur, size = [], 0
    cur.append((name, shape)); size += n
shards.append(cur)

weight_map, total = {}, 0
for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {}, 0
    for name, shape in shard:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
        weight_map[name] = fname
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(a.out, fname), "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for k, (name, shape) in enumerate(shard):
            count = int(np.prod(shape))
            if len(shape) == 1:
                np.ones(count, dtype=np.float16).tofile(f)
                continue
            start = (k * 7919) % (pool.size // 2)
            left = count
            while left:
                take = min(left, pool.size - start)
                pool[start:start + take].tofile(f)
                left -= take; start = 0
    total += off
    print(f"{fname}: {off / 1e9:.2f} GB", file=sys.stderr)
json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
          open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
print(f"{a.out}: {total / 1e9:.2f} GB, {total // 2 / 1e9:.2f}B parameters in {len(shards)} shards")
