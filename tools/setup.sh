#!/usr/bin/env bash
# Set up a fresh machine for scfoundation: a virtual environment in .venv with the CPU
# build of PyTorch first (the wheel on disk; a looser pin would pull a multi-GB CUDA build),
# then the package with its dev extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# nbdev 2.4.14 declares fastcore>=1.12.3 but only runs with the 1.8 line (newer fastcore
# removed names nbdev 2 imports): pin it after the resolver is done.
pip install -q "fastcore==1.8.18" 2>&1 | grep -v "dependency resolver\|requires fastcore\|^$" || true
# Debian's Chromium for the docs site's browser test (tests/test_docs.py); needs root for apt-get.
if [ "$(id -u)" = 0 ]; then bash tools/setup_browser.sh
elif ! command -v chromium >/dev/null 2>&1; then echo "note: chromium missing and not root: the browser tests of the docs will be skipped"; fi
python -c "import scfoundation, torch, nbdev; print('scfoundation', scfoundation.__version__, '| torch', torch.__version__)"
