#!/usr/bin/env bash
# The main job on a fresh clone: set up .venv, then run the demo offline.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
HF_HUB_OFFLINE=1 .venv/bin/dreamllm-hf demo "$@"
