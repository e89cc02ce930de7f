#!/usr/bin/env bash
# Builds the Python package (python/, PyO3 + maturin, abi3) into a virtual environment and
# runs its pytest suite: the API against the CLI's own output, errors as exceptions, and the
# engine adapters where their engines are installed (llama-cpp-python, transformers + torch;
# those tests skip otherwise).
#
#   scripts/python-check.sh                    # venv in target/python-venv (made if missing)
#   TANDEM_VENV=/path/venv scripts/python-check.sh  # an existing venv (e.g. with the engines)
#   scripts/python-check.sh -k llama           # extra arguments go to pytest
#   TANDEM_BIN=target/release/tandem scripts/python-check.sh   # a CLI already built (CI's)
#   TANDEM_PY_SETUP_ONLY=1 scripts/python-check.sh             # the venv only (CI, early)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
venv=${TANDEM_VENV:-$here/target/python-venv}
phase() { echo "-- $1 ($SECONDS s)" >&2; }
phase "venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" pytest numpy
[ -z "${TANDEM_PY_SETUP_ONLY:-}" ] || exit 0
phase "cli"
# The CLI the tests compare with, and the Python module, from one target folder (the library
# crates compile once for both). Built with --workspace, as `cargo test --workspace` does: the
# Python crate's pyo3 turns on features of shared dependencies (once_cell's default, syn's
# visit-mut) for every crate built beside it, so `-p tandem` alone compiled a second copy of
# most dependencies (162 s of CI's python stage); this reuses the test build's.
# A TANDEM_BIN given by the caller (CI passes the one `cargo test` just built) is used as is.
if [ -z "${TANDEM_BIN:-}" ]; then
  cargo build --release --quiet --workspace --bin tandem
  TANDEM_BIN=$here/target/release/tandem
fi
export TANDEM_BIN
export CARGO_TARGET_DIR=$here/target
phase "maturin"
(cd python && VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH "$venv/bin/maturin" develop --release --quiet)
phase "pytest"
cd python && "$venv/bin/python" -m pytest -q tests "$@"
