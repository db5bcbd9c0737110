#!/usr/bin/env bash
# The test suite on a fresh clone: set up .venv, then run every test in one pytest process, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
