#!/usr/bin/env bash
# Builds the kernels crate for aarch64 (its NEON int8 kernel and the portable paths) and runs
# its unit tests under qemu user-mode emulation: every fast kernel against its reference on
# an ARM instruction set, without ARM hardware.
#
# Needs the Rust target (`rustup target add aarch64-unknown-linux-gnu`) and Debian's
# qemu-user, gcc-aarch64-linux-gnu and libc6-dev-arm64-cross; installs them when it can.
# Where it cannot (no rustup download, no apt), it says "skipped" and exits 0; a failing
# test still fails it. Under a minute on 2 cores once installed (LINT=1 adds clippy for the
# target). `--install-only` installs and stops (CI runs it in the background while the tests
# build, so the downloads overlap them).
set -euo pipefail
cd "$(dirname "$0")/.."
t=aarch64-unknown-linux-gnu
skip() { echo "check-aarch64: skipped ($1)"; exit 0; }
rustup target list --installed 2>/dev/null | grep -qx $t \
  || rustup target add $t >/dev/null 2>&1 || skip "cannot install the Rust target $t"
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  command -v apt-get >/dev/null || skip "no qemu-aarch64 / aarch64-linux-gnu-gcc and no apt-get"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null) || skip "cannot install qemu-user / the cross linker"
fi
[ "${1:-}" = --install-only ] && exit 0
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# Lints too with LINT=1 (a second, check-mode build of the dependencies: left out of CI for time).
if [ "${LINT:-0}" = 1 ]; then cargo clippy -p tandem-kernels --all-targets --target $t -- -D warnings; fi
cargo test --release -p tandem-kernels --lib --target $t
