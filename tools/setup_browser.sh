#!/usr/bin/env bash
# Install Debian's Chromium (headless browser for tests/test_docs.py) only when it is missing.
# Needs root (CI runs as root). Safe to run again: does nothing when /usr/bin/chromium exists.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium present: $(chromium --version 2>/dev/null || echo unknown version)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed $(chromium --version)"
