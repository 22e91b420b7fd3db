#!/usr/bin/env bash
# The generated Kotlin bindings on the JVM (through JNA, as on Android) against a real
# coordinator on 127.0.0.1: compiles the Kotlin that scripts/bindings.sh generated together
# with BindingsTest.kt, then runs it (the scenario of bindings/tests/test_python.py). Exits
# non-zero on a compile error or any failed check.
#   bindings/tests/kotlin/run.sh   (after cargo build --release --workspace and scripts/bindings.sh)
# Toolchain: scripts/kotlin-toolchain.sh (Kotlin 2.4 from the npm registry, Debian's JNA),
# installed on first use into ~/.cache/crosslm/kotlin.
# Env: CARGO_TARGET_DIR (library, coordinator), CROSSLM_BINDINGS (default
# $CARGO_TARGET_DIR/bindings), CROSSLM_LIB_DIR (where libcrosslm_ffi.so is; default
# $CARGO_TARGET_DIR/release), CROSSLM_ASSETS (the MiniLM tokenizer the bag model uses).
set -euo pipefail
cd "$(dirname "$0")/../../.."
. scripts/env.sh
eval "$(scripts/kotlin-toolchain.sh)"
GEN="${CROSSLM_BINDINGS:-$CARGO_TARGET_DIR/bindings}/kotlin"
LIB_DIR="${CROSSLM_LIB_DIR:-$CARGO_TARGET_DIR/release}"
COORDINATOR="$CARGO_TARGET_DIR/release/crosslm-coordinator"
[ -d "$GEN" ] || { echo "no generated Kotlin in $GEN: run scripts/bindings.sh" >&2; exit 1; }
for f in "$LIB_DIR/libcrosslm_ffi.so" "$COORDINATOR" "$CROSSLM_ASSETS/minilm/tokenizer.json"; do
  [ -f "$f" ] || { echo "missing $f: run cargo build --release --workspace (and scripts/fetch-assets.sh)" >&2; exit 1; }
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# C1 only: kotlinc runs briefly (measured: 25 s of CPU instead of 44 s with the default JIT).
JAVA_OPTS="${JAVA_OPTS:--Xmx1G -XX:TieredStopAtLevel=1}" "$KOTLIN_HOME/bin/kotlinc" -cp "$KOTLIN_CP" -d "$WORK/test.jar" \
  $(find "$GEN" -name '*.kt') bindings/tests/kotlin/BindingsTest.kt
mkdir "$WORK/scratch"
# The test bounds each long call itself; the outer timeout is a last resort (SIGTERM lets the
# JVM's shutdown hook stop the coordinators).
timeout 600 java -cp "$KOTLIN_CP:$WORK/test.jar" -Djna.library.path="$LIB_DIR" \
  BindingsTestKt "$COORDINATOR" "$CROSSLM_ASSETS" "$WORK/scratch"
