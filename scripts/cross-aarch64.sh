#!/usr/bin/env bash
# Cross-builds the bindings' library (libcrosslm_ffi.so) for 64-bit ARM Linux, the nearest
# check here that nothing in the SDK is x86-only (no Android NDK can be had from the package
# registries), and prints its size stripped. Needs the Rust target and Debian's cross gcc:
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   scripts/cross-aarch64.sh
# Builds in its own target dir ($CROSSLM_CROSS_TARGET_DIR, default ~/.cache/crosslm/target-cross),
# so it never holds the main build's lock; a first build takes as long as the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CROSSLM_CROSS_TARGET_DIR:-$HOME/.cache/crosslm/target-cross}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --target "$T" -p crosslm-ffi --lib
LIB="$CARGO_TARGET_DIR/$T/release/libcrosslm_ffi.so"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
aarch64-linux-gnu-strip -o "$OUT/libcrosslm_ffi.so" "$LIB"
file "$LIB" | sed 's/, BuildID.*//'
printf 'unstripped %s bytes, stripped %s bytes (%s MiB)\n' "$(stat -c %s "$LIB")" \
  "$(stat -c %s "$OUT/libcrosslm_ffi.so")" \
  "$(awk -v b="$(stat -c %s "$OUT/libcrosslm_ffi.so")" 'BEGIN{printf "%.1f", b/1048576}')"
