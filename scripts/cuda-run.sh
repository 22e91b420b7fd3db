#!/usr/bin/env bash
# Runs the CUDA checks of a folder made by scripts/cuda-bundle.sh, on a machine with an NVIDIA
# GPU: the `::cuda::` tests and gpu_forward_matches_flex, then the LLM bench on the GPU beside
# PyTorch (needs python3 with torch, transformers, accelerate and gguf), for each variant
# built. Logs go to $LOGS (default ./logs).
#
# usage: ./cuda-run.sh [tests|bench|all]   (default all)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
what="${1:-all}"
logs="${LOGS:-$here/logs}"
mkdir -p "$logs"
export CROSSLM_ASSETS="$here/assets" CARGO_MANIFEST_DIR="$here/repo/coordinator"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}" RUST_BACKTRACE=1
# libcuda from the driver; NVRTC and friends where CUDA or pip put them.
extra=$(ls -d /usr/local/nvidia/lib64 /usr/local/cuda/lib64 \
  "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "bundle of commit $(cat "$here/COMMIT" 2>/dev/null), model $(cat "$here/MODEL" 2>/dev/null)"

# What one small kernel launch costs here (a decoding step launches hundreds).
python3 - <<'PY' 2>/dev/null || echo "(no torch: launch cost not measured)"
import time, torch
x = torch.zeros(1, device="cuda")
torch.cuda.synchronize()
for n in (200, 2000):
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    print(f"torch: {n} tiny kernels, {(time.perf_counter() - t) / n * 1e6:.1f} us a launch")
PY

status=0
for tests in "$here"/bin/tests-*; do
  v="${tests##*/tests-}"
  if [ "$what" = all ] || [ "$what" = tests ]; then
    echo "== $(date +%T) $v: tests"
    "$tests" --test-threads 1 gpu_forward_matches_flex llm::device:: 2>&1 | tee "$logs/tests-$v.log" | tail -4 || status=1
    "$tests" --ignored --test-threads 1 ::cuda:: 2>&1 | tee -a "$logs/tests-$v.log" | grep -v '^\s*$' | tail -30 || status=1
  fi
  if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== $(date +%T) $v: bench"
    CROSSLM_BENCH_DEVICE=gpu CROSSLM_BENCH_MODEL="$(cat "$here/MODEL" 2>/dev/null || echo smollm2)" \
      CROSSLM_BENCH_PYTHON="${CROSSLM_BENCH_PYTHON:-python3}" "$here/bin/bench-$v" --bench 2>&1 |
      grep -v 'Loading weights' | tee "$logs/bench-$v.log" | tail -30 || status=1
  fi
done
echo "== $(date +%T) done; logs in $logs"
exit $status
