#!/usr/bin/env bash
# Installs the benchmarks' references into a venv outside the checkout and outside CI:
# llama-cpp-python (built from source by pip, so llama.cpp is compiled for this CPU) for
# `cargo bench --workspace --bench llm`, torch + tokenizers + safetensors for `--bench slm`.
# Both benches find the venv on their own (~/.cache/crosslm/venv).
set -euo pipefail
venv="${CROSSLM_BENCH_VENV:-$HOME/.cache/crosslm/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet numpy llama-cpp-python==0.3.36
"$venv/bin/pip" install --quiet torch tokenizers safetensors
"$venv/bin/python" -c 'import llama_cpp, torch; print("llama-cpp-python", llama_cpp.__version__, "torch", torch.__version__)'
