#!/usr/bin/env bash
# Generates the Kotlin, Swift and Python bindings of crosslm-ffi from the library that
# `cargo build --release --workspace` built, with the in-repo uniffi-bindgen (same uniffi
# version as the library). Builds nothing itself.
#   scripts/bindings.sh [OUT]   (default: $CARGO_TARGET_DIR/bindings, outside the checkout)
# OUT/python also gets a copy of the library, so `import crosslm_ffi` works from there.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
B="$CARGO_TARGET_DIR/release"
case "$(uname -s)" in
  Darwin) LIB="$B/libcrosslm_ffi.dylib" ;;
  *) LIB="$B/libcrosslm_ffi.so" ;;
esac
for f in "$LIB" "$B/uniffi-bindgen"; do
  [ -f "$f" ] || { echo "missing $f: run cargo build --release --workspace first" >&2; exit 1; }
done
OUT="${1:-$CARGO_TARGET_DIR/bindings}"
rm -rf "$OUT"
for lang in python kotlin swift; do
  "$B/uniffi-bindgen" generate --library "$LIB" --language "$lang" \
    --config bindings/uniffi.toml --out-dir "$OUT/$lang" --no-format
done
cp "$LIB" "$OUT/python/"
echo "bindings in $OUT:"
find "$OUT" -type f | sort
