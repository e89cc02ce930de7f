#!/usr/bin/env bash
# Renders a report.html to a PNG with headless Chromium (Debian package `chromium`).
#   scripts/render-report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
set -euo pipefail
html=$(realpath "$1"); out=$(realpath -m "$2"); size=${3:-1280,2000}
size=${size/x/,}
chrome=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$chrome" ] || { echo "chromium not found (apt-get install chromium)" >&2; exit 3; }
prof=$(mktemp -d); trap 'rm -rf "$prof"' EXIT
# --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
timeout 120 "$chrome" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$prof" --window-size="$size" --screenshot="$out" "file://$html" >/dev/null 2>&1
[ -s "$out" ] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
