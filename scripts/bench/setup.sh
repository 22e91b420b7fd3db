#!/usr/bin/env bash
# Installs the benchmarks' references into a venv outside the checkout and outside CI:
# llama-cpp-python (built from source by pip, so llama.cpp is compiled for this CPU) for
# `cargo bench --workspace --bench llm`, torch + tokenizers + safetensors for `--bench slm`.
# Both benches find the venv on their own (~/.cache/crosslm/venv).
#
# `--llama-avx2` instead builds llama.cpp for AVX2 alone (no AVX-512, no VNNI) into
# ~/.cache/crosslm/venv-avx2: the reference for `CROSSLM_SIMD=avx2` runs, the path an AVX2-only
# CPU (AMD Zen 3, say) takes on both sides; pass its Python as `CROSSLM_BENCH_PYTHON`.
set -euo pipefail
if [ "${1:-}" = "--llama-avx2" ]; then
    venv="${CROSSLM_BENCH_VENV:-$HOME/.cache/crosslm/venv-avx2}"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet numpy
    # No wheel cache: a cached build for this CPU would be reused whatever the flags.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
-DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DGGML_AMX_BF16=OFF" "$venv/bin/pip" install --quiet --no-cache-dir --force-reinstall \
        --no-binary llama-cpp-python llama-cpp-python==0.3.36
    "$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'
    exit 0
fi
venv="${CROSSLM_BENCH_VENV:-$HOME/.cache/crosslm/venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet numpy llama-cpp-python==0.3.36
"$venv/bin/pip" install --quiet torch tokenizers safetensors
"$venv/bin/python" -c 'import llama_cpp, torch; print("llama-cpp-python", llama_cpp.__version__, "torch", torch.__version__)'
