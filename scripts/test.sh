#!/usr/bin/env bash
# The test suite on a fresh clone: set up .venv, lint with ruff, then run every test in one pytest process, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
# The web page's browser test drives the system Chromium (Playwright's own browser download is not reachable here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "test.sh: chromium is missing and cannot be installed here (that needs root and apt-get);" \
      "tests/test_serve.py's browser test will fail. Install it with: sudo apt-get install -y chromium" >&2
  fi
fi
# Lint and format first (transformers' ruff settings, pyproject.toml), then the tests.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
