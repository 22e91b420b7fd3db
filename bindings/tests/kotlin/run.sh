#!/usr/bin/env bash
# Compiles the generated Kotlin bindings with Smoke.kt and runs it on the JVM through JNA.
# Needs Debian's kotlin, libjna-java and libkotlinx-coroutines-java (not in CI: kotlinc is
# slow to start and the check is a smoke test; see bindings/README.md).
set -euo pipefail
cd "$(dirname "$0")/../../.."
. scripts/env.sh
GEN="${CROSSLM_BINDINGS:-$CARGO_TARGET_DIR/bindings}/kotlin"
[ -d "$GEN" ] || { echo "no generated Kotlin in $GEN: run scripts/bindings.sh" >&2; exit 1; }
CP=/usr/share/java/jna.jar:/usr/share/java/kotlinx-coroutines-core.jar
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
kotlinc -nowarn -cp "$CP" -d "$WORK/smoke.jar" $(find "$GEN" -name '*.kt') bindings/tests/kotlin/Smoke.kt
kotlin -cp "$CP:$WORK/smoke.jar" -Djna.library.path="$CARGO_TARGET_DIR/release" SmokeKt "$WORK"
