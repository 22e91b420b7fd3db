#!/usr/bin/env bash
# Builds the CUDA checks (the coordinator's test binary and the LLM bench, `cuda` build) and packs
# them with what they read into one folder, to run on a GPU machine that has the NVIDIA driver
# and Python with torch but no cargo or network: copy the folder there and run
# `./cuda-run.sh` inside it (it runs the `::cuda::` tests and `CROSSLM_BENCH_DEVICE=gpu`).
#
# usage: scripts/cuda-bundle.sh [--fusion] [--model smollm2|qwen2] [--split-mb N] [DEST]
#   --fusion      also build the `cuda-fusion` variant (burn's kernel fusion and autotune) and
#                 bench it beside the plain one in the same run
#   --model       which GGUF goes in (default smollm2; the tests always need smollm2)
#   --split-mb N  also cut the packed folder into N-MB parts (DEST.tar.xz.00, ...), for copies
#                 that limit a file's size; `cat DEST.tar.xz.* | tar -xJ` joins them
#   DEST          default ~/.cache/crosslm/cuda-bundle
# Needs the LLVM of scripts/cuda-llvm.sh (it is run first) and the CUDA target dir
# (~/.cache/crosslm/target-cuda; a first build takes ~22 min on 2 cores, --fusion ~14 more).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
say() { printf '[cuda-bundle] %s\n' "$*" >&2; }

fusion=0 model=smollm2 split_mb=0 dest="$HOME/.cache/crosslm/cuda-bundle"
while [ $# -gt 0 ]; do
  case "$1" in
    --fusion) fusion=1 ;;
    --model) model="$2"; shift ;;
    --split-mb) split_mb="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) say "unknown option $1"; exit 1 ;;
    *) dest="$1" ;;
  esac
  shift
done

./scripts/cuda-llvm.sh >/dev/null
export CARGO_TARGET_DIR="$HOME/.cache/crosslm/target-cuda"

# Builds one variant and prints its two executables (test binary, bench binary).
build() {
  local features="$1" test bench
  test=$(cargo test --release --workspace --features "$features" --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "crosslm_coordinator" and m.get("executable"):
        print(m["executable"])')
  bench=$(cargo bench --workspace --features "$features" --bench llm --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "llm" and m.get("executable"):
        print(m["executable"])')
  [ -n "$test" ] && [ -n "$bench" ] || { say "build with $features failed (rerun the cargo commands to see why)"; exit 1; }
  echo "$test $bench"
}

rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/assets/smollm2" "$dest/assets/data/mr" "$dest/repo/coordinator" \
  "$dest/repo/scripts/bench" "$dest/repo/examples/tasks"
variants=(cuda)
[ "$fusion" = 1 ] && variants+=(cuda-fusion)
for v in "${variants[@]}"; do
  say "building the $v variant"
  read -r test bench < <(build "crosslm-coordinator/$v")
  cp "$test" "$dest/bin/tests-$v"
  cp "$bench" "$dest/bin/bench-$v"
done
strip "$dest"/bin/*

# What the binaries read: the model files, MR data, the task, the reference script, and a
# Cargo.lock that marks the folder as the workspace root (`workspace_root`).
cp "$CROSSLM_ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest/assets/smollm2/"
if [ "$model" = qwen2 ]; then
  mkdir -p "$dest/assets/qwen2"
  cp "$CROSSLM_ASSETS"/qwen2/*.gguf "$dest/assets/qwen2/"
fi
cp "$CROSSLM_ASSETS"/data/mr/*.txt "$dest/assets/data/mr/"
cp examples/tasks/mr.toml "$dest/repo/examples/tasks/"
cp scripts/bench/llm_torch.py "$dest/repo/scripts/bench/"
cp Cargo.lock "$dest/repo/"
cp scripts/cuda-run.sh "$dest/"
echo "$model" >"$dest/MODEL"
git rev-parse HEAD >"$dest/COMMIT"
say "bundle in $dest ($(du -sh "$dest" | cut -f1)); run ./cuda-run.sh there"

if [ "$split_mb" -gt 0 ]; then
  rm -f "$dest".tar.xz.*
  # One dictionary over every binary: the variants share most of their bytes (LLVM).
  tar -C "$(dirname "$dest")" -cf - "$(basename "$dest")" |
    xz -T2 --lzma2=preset=6,dict=512MiB | split -b "${split_mb}M" -d -a 2 - "$dest.tar.xz."
  say "parts: $(ls "$dest".tar.xz.* | tr '\n' ' ')"
fi
