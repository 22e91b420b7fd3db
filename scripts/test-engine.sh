#!/usr/bin/env bash
# The serving-engine integration test (tests/tests/engine.rs): llama-cpp-python's
# OpenAI-compatible server on 127.0.0.1 writes the samples of two CrossLM rounds with a real
# client. Not in the default test run: installing llama-cpp-python builds llama.cpp (minutes).
#   scripts/test-engine.sh
# Env: CROSSLM_ENGINE_PYTHON (a python with llama-cpp-python[server]; default: a venv made in
# ~/.cache/crosslm/engine-venv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
if [ -z "${CROSSLM_ENGINE_PYTHON:-}" ]; then
  VENV="$HOME/.cache/crosslm/engine-venv"
  if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "llama-cpp-python[server]==0.3.36"
  fi
  export CROSSLM_ENGINE_PYTHON="$VENV/bin/python"
fi
cargo build --release --workspace --bins
cargo test --release --workspace --test engine -- --ignored --nocapture
