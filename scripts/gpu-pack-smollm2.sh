#!/usr/bin/env bash
# Packs SmolLM2-135M-Instruct (F16, 270 MB) and the GPU binaries for the device tool, which
# carries at most 64 MiB per call and whose GPU machine reaches no network: the weights are
# xz-compressed (163 MB) and split over three folders, .gpu-model/c1, c2 and c3, each carried
# by its own call while the machine stays warm (it keeps /tmp between calls). c3 also holds the
# binaries (scripts/gpu-bundle.sh, xz-compressed) and run.sh, which joins the parts, checks the
# weights' SHA-256 and runs scripts/gpu-check.sh with SMOLLM2 set. The calls, one after another:
#
#   scripts/gpu-bundle.sh && scripts/gpu-pack-smollm2.sh        # here
#   carry .gpu-model/c1:  mkdir -p /tmp/tm && cp .gpu-model/c1/* /tmp/tm/
#   carry .gpu-model/c2:  cp .gpu-model/c2/* /tmp/tm/
#   carry .gpu-model/c3:  set -o pipefail; bash .gpu-model/c3/run.sh 2>&1 | tee $OUT/log
#
# run.sh leaves the log and every `bench spec` JSON (json.tgz) in $OUT. SYNTH=1 there adds the
# synthetic 0.76B model's runs. .gpu-model is ignored by git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-${TANDEM_MODELS:-$HOME/.cache/tandem/models}/smollm2-135m-f16}
[ -f "$model/model.safetensors" ] || { echo "gpu-pack-smollm2: no $model/model.safetensors (scripts/fetch-models.sh)" >&2; exit 1; }
[ -x target/gpu-bundle/tandem ] || { echo "gpu-pack-smollm2: run scripts/gpu-bundle.sh first" >&2; exit 1; }
grep -qx '/.gpu-model/' .git/info/exclude 2>/dev/null || echo '/.gpu-model/' >>.git/info/exclude
out=.gpu-model
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out/c1" "$out/c2" "$out/c3"
sha=$(sha256sum "$model/model.safetensors" | cut -d' ' -f1)
xz -6 -T0 -c "$model/model.safetensors" >"$tmp/model.xz"
# 58 MB parts: each call also carries the ~5 MB working tree, under the 64 MiB limit.
split -b 58000000 -d -a 1 "$tmp/model.xz" "$tmp/part"
parts=$(ls "$tmp"/part* | wc -l)
[ "$parts" = 3 ] || { echo "gpu-pack-smollm2: $parts parts, the calls below expect 3" >&2; exit 1; }
mv "$tmp/part0" "$out/c1/"
mv "$tmp/part1" "$out/c2/"
mv "$tmp/part2" "$out/c3/"
tar -C "$model" -cf - config.json tokenizer.json tokenizer_config.json | xz -6 >"$out/c3/smol-small.tar.xz"
tar -C target -cf - gpu-bundle | xz -6 -T0 >"$out/c3/bundle.tar.xz"
cat >"$out/c3/run.sh" <<EOF
#!/usr/bin/env bash
# On the GPU machine, after the calls that carried .gpu-model/c1 and c2 into /tmp/tm: joins
# SmolLM2's parts and the binaries, then runs scripts/gpu-check.sh (made by gpu-pack-smollm2.sh).
set -uo pipefail
mkdir -p /tmp/smol target
cp .gpu-model/c3/part2 /tmp/tm/ || exit 1
cat /tmp/tm/part0 /tmp/tm/part1 /tmp/tm/part2 | python3 -c "import lzma, sys, shutil; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open('/tmp/smol/model.safetensors', 'wb'), 1 << 22)" || exit 1
python3 -c "import tarfile; tarfile.open('.gpu-model/c3/smol-small.tar.xz').extractall('/tmp/smol'); tarfile.open('.gpu-model/c3/bundle.tar.xz').extractall('target')" || exit 1
echo "$sha  /tmp/smol/model.safetensors" | sha256sum -c || exit 1
chmod +x target/gpu-bundle/*
SMOLLM2=/tmp/smol QUICK=1 SYNTH=\${SYNTH:-0} GPU_CHECK_OUT=\$OUT/json bash scripts/gpu-check.sh
tar -czf \$OUT/json.tgz -C \$OUT json && rm -rf \$OUT/json
EOF
du -sb "$out"/c1 "$out"/c2 "$out"/c3 >&2
