#!/usr/bin/env python3
# Cuts the first ROWS rows of chosen tensors out of llama-quantize outputs into one small GGUF.
import sys, numpy as np
from gguf import GGUFReader, GGUFWriter
ROWS = 16
out = GGUFWriter(sys.argv[1], "fixture")
for spec in sys.argv[2:]:
    path, name = spec.split(":")
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    rows = np.ascontiguousarray(np.asarray(t.data)[:ROWS])
    out.add_tensor(f"{t.tensor_type.name}/{name}", rows, raw_dtype=t.tensor_type)
out.write_header_to_file(); out.write_kv_data_to_file(); out.write_tensors_to_file(); out.close()
