# Sourced by the benchmark and fixture scripts: the repository root, the tandem binary, the
# llama.cpp tools, SmolLM2's F16 folder (fetched on first use) and the evaluation text.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${TANDEM_BIN:-$root/target/release/tandem}
B=${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to llama.cpp build/bin}
smol=$(TANDEM_BIN=$T bash "$root/scripts/fetch-models.sh" | tail -1)/smollm2-135m-f16
W=$root/../shared/data/wikitext-2-raw/wiki.test.raw
