#!/usr/bin/env bash
# Install Debian's Chromium (headless browser for tests/test_docs.py) only when it is missing.
# Needs root (CI runs as root). Safe to run again: does nothing when /usr/bin/chromium exists.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium present: $(chromium --version 2>/dev/null | head -1)"; exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "chromium missing: run this script as root (it uses apt-get)"; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed $(chromium --version 2>/dev/null | head -1)"
