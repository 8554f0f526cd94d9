#!/usr/bin/env bash
# Set up a fresh machine for scfoundation: a virtual environment in .venv with the CPU
# build of PyTorch first (the wheel on disk; a looser pin would pull a multi-GB CUDA build),
# then the package with its dev extras. Safe to run again: it only installs what is missing,
# and puts back pinned versions that a later install changed.
#
# constraints.txt pins torch, fastcore, nbdev and execnb. It is named in the venv's own pip config
# (.venv/pip.conf), so every later `pip install` in .venv (transformers, the extras again, ...) keeps
# those versions or stops with a conflict, instead of upgrading fastcore past what nbdev 2 runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
case "$ROOT" in
  *[[:space:]]*) echo "setup.sh: $ROOT has a space in it, which pip's config cannot name: pip installs in .venv will not see constraints.txt" >&2;;
  *) python -m pip config --site set install.constraint "$ROOT/constraints.txt" >/dev/null;;  # writes .venv/pip.conf
esac
C=(-c "$ROOT/constraints.txt")  # for this script's installs, whatever the config says
pip install -q "${C[@]}" "torch==2.13.0"
# (when this puts fastcore back to its pin, pip warns that nbdev declares fastcore>=1.12.3: expected, see below)
pip install -q "${C[@]}" -e ".[dev]" 2> >(grep -v "dependency resolver does not currently\|nbdev [0-9.]* requires fastcore" >&2 || true)
# nbdev 2.4.14 declares fastcore>=1.12.3 but only runs with the 1.8 line (newer fastcore removed
# names nbdev 2 imports): install it without its declared dependencies. Its real ones are in the
# dev extra (settings.ini), under the constraints.
NODEPS=$(python -c "import configparser as c; p = c.ConfigParser(delimiters=['=']); p.read('settings.ini'); print(p['DEFAULT']['nodeps_requirements'])")
pip install -q --no-deps "${C[@]}" $NODEPS
# Debian's Chromium for the docs site's browser test (tests/test_docs.py); needs root for apt-get.
if [ "$(id -u)" = 0 ]; then bash tools/setup_browser.sh
elif ! command -v chromium >/dev/null 2>&1; then echo "note: chromium missing and not root: the browser tests of the docs will be skipped"; fi
python tools/check_env.py
python -c "import scfoundation, torch, nbdev, fastcore; print('scfoundation', scfoundation.__version__, '| torch', torch.__version__, '| nbdev', nbdev.__version__, '| fastcore', fastcore.__version__)"
