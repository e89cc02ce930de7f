#!/usr/bin/env bash
# Builds, here, everything scripts/gpu-check.sh runs, with `--features cuda`, and copies it
# stripped into target/gpu-bundle (~tens of MB). The GPU machines lent to this project have the
# CUDA driver and toolkit but no Rust toolchain and no network, so the binaries travel to them
# (the device tool's `carry: ["target/gpu-bundle"]`) and gpu-check.sh runs them from there.
# x86-64 only (the GPU machines are x86-64).
#
#   scripts/gpu-bundle.sh && scripts/gpu-check.sh     # the second on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-bundle
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
rm -rf "$out"
mkdir -p "$out"

# Paths of the executables a `cargo ... --message-format=json` build made.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])'
}

cargo build --release --features cuda --bin tandem
cp "$CARGO_TARGET_DIR/release/tandem" "$out/tandem"
# The root package's GPU tests (forward pass, speculative decoding through the CLI).
cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | executables | while read -r e; do cp "$e" "$out/test-gpu"; done
# The kernels' GPU tests (the NVRTC compile check among them), and their unit tests built
# with the GPU feature.
cargo test --release -p tandem-kernels --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | executables | while read -r e; do cp "$e" "$out/test-kernels-gpu"; done
cargo test --release -p tandem-kernels --features cuda --lib --no-run --message-format=json 2>/dev/null \
  | executables | while read -r e; do cp "$e" "$out/test-kernels-lib"; done
cargo build --release -p tandem-kernels --features cuda --example gpu_bench
cp "$CARGO_TARGET_DIR/release/examples/gpu_bench" "$out/gpu_bench"
strip "$out"/*
git describe --always --dirty >"$out/COMMIT" 2>/dev/null || true
for f in tandem test-gpu test-kernels-gpu test-kernels-lib gpu_bench; do
  [ -x "$out/$f" ] || { echo "gpu-bundle: $f was not built" >&2; exit 1; }
done
du -sh "$out" >&2
