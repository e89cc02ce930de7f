#!/usr/bin/env bash
# Mutation fuzzing of tandem's readers of untrusted bytes (GGUF header/metadata/tensor table,
# safetensors + config.json, the tokenizer rebuilt from GGUF metadata, imatrix GGUF and .dat,
# recipe TOML, the C ABI's inputs). Stable Rust: see fuzz/src/main.rs.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET]     # default 60 s, all targets
#
# Replays fuzz/corpus/<target>/ first, then mutates seeds cut from the real files. Exits 1 on
# any finding (a panic, an error that is not one clean line, an allocation over 256 MiB, an
# input running over 20 s); the input is in fuzz/findings/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p tandem-fuzz
exec target/release/tandem-fuzz "${2:-all}" --seconds "${1:-60}"
